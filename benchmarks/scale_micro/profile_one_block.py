import cProfile, pstats, sys, time, json, os
from pathlib import Path
import torch
torch.set_num_threads(2)
sys.argv = ["x"]
sys.path.insert(0, "/work/wt16b/benchmarks")
import bench_scale
from types import SimpleNamespace
args = SimpleNamespace(workdir="/tmp/bench_scale16b", blocks=int(os.environ.get("BLOCKS", "1")), windows=16, seq_len=128, partial=None, progress=True, timings=False)
prof = cProfile.Profile()
prof.enable()
row = bench_scale.row_llama3b_sequential(args)
prof.disable()
print(json.dumps(row, default=str))
prof.dump_stats(os.environ.get("PROF_OUT", "/tmp/wt16b_prof.out"))
s = pstats.Stats(prof); s.sort_stats("tottime").print_stats(30)
s.sort_stats("cumulative").print_stats(40)
