import torch, time
torch.set_num_threads(2)
print(torch.__version__, torch.get_num_threads(), torch.backends.mkl.is_available() if hasattr(torch.backends,'mkl') else None)
print(torch.__config__.show()[:1500])
def t(name, f):
    s=time.perf_counter(); r=f(); print(f"{name}: {time.perf_counter()-s:.1f}s", flush=True); return r
a=torch.randn(3072,3072,dtype=torch.float64)
t("svd 3072x3072 f64", lambda: torch.linalg.svd(a, full_matrices=False))
t("svdvals 3072 f64", lambda: torch.linalg.svdvals(a))
b=torch.randn(8192,3072,dtype=torch.float64)
t("svd 8192x3072 f64", lambda: torch.linalg.svd(b, full_matrices=False))
x=torch.randn(2048,8192,dtype=torch.float64)
g=(x.t()@x)/2048
t("cholesky_ex 8192 (rank def)", lambda: torch.linalg.cholesky_ex(g))
g2=g+1e-3*torch.eye(8192,dtype=torch.float64)
L=t("cholesky_ex 8192 (pd)", lambda: torch.linalg.cholesky_ex(g2))[0]
w=torch.randn(3072,8192,dtype=torch.float64)
t("W@L 3072x8192x8192", lambda: w@L)
t("solve_tri 3072x8192", lambda: torch.linalg.solve_triangular(L, w, upper=False, left=False))
f=torch.randn(3072,3072); t("f32 gemm 3072^3", lambda: f@f)
