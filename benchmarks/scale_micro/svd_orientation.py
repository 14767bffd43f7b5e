import torch, time
torch.set_num_threads(2)
def t(name, f):
    s=time.perf_counter(); r=f(); print(f"{name}: {time.perf_counter()-s:.1f}s", flush=True); return r
w=torch.randn(1024,3072,dtype=torch.float64)
t("svd 1024x3072", lambda: torch.linalg.svd(w, full_matrices=False))
t("svd 3072x1024 (transposed)", lambda: torch.linalg.svd(w.t().contiguous(), full_matrices=False))
t("svd 1024x3072 f32", lambda: torch.linalg.svd(w.float(), full_matrices=False))
