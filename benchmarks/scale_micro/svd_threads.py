import torch, time, sys, os
torch.set_num_threads(int(sys.argv[1]))
w=torch.randn(3072,1024,dtype=torch.float64, generator=torch.Generator().manual_seed(0))
s=time.perf_counter(); torch.linalg.svd(w, full_matrices=False); print(sys.argv[1], os.environ.get("OMP_WAIT_POLICY"), f"svd 3072x1024: {time.perf_counter()-s:.1f}s", os.getloadavg()[0], flush=True)
