import sys, torch, faulthandler
faulthandler.enable()
sys.path.insert(0, "tests")
from pathlib import Path
import tempfile
from conftest import make_hf_model, save_checkpoint
from nanoserve import LLM, cpu_gemv
llm = LLM(str(save_checkpoint(make_hf_model(), Path(tempfile.mkdtemp()) / "m")), device="cpu", quiet=True, num_blocks=16)
ext = cpu_gemv.extension()
dec_step = llm.engine.runner.cpu_decode
# reach the C++ check directly: a token id past the vocabulary, through the pybind Decoder
import nanoserve.cpu_step as cs
orig = cs._check
cs._check = lambda *a: None
try:
    dec_step([60000], [3], [3], [4], [[0]], llm.engine.kv_cache, False)
    print("pybind: no exception?!")
except Exception as e:
    print("pybind Decoder raised", type(e).__name__, str(e).splitlines()[0][:120], flush=True)
try:
    torch.ops.nanoserve_cpu.gemv_fp32(torch.randn(1, 5), torch.zeros(2, 5, 16, 1), 16, None)
    print("op: no exception?!")
except Exception as e:
    print("torch op raised", type(e).__name__, str(e).splitlines()[0][:120], flush=True)
