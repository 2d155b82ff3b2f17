"""The exports on a CUDA device (skipped on CPU with the reason): transformers' packed offline ``bitnet`` path (b158)
and the v2 remote code load on the GPU and compute the project model's logits (the project model in fp32 on the
CPU, the export in fp32 on the GPU; TF32 off). The same checks run on CPU in test_export.py; this file adds the
CUDA path of transformers' bitnet integration (its unpacking and activation quantization compiled for CUDA).

The merger runs it on a GPU machine: pytest -q tests/export/test_export_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from bitnet_dist.export import ensure_transformers

ensure_transformers()
pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

import export_utils as eu  # noqa: E402
from dist_utils import run_ranks  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU path of the "
                                 "same exports is tested in tests/export/test_export.py)")]


@pytest.mark.parametrize("precision, latent", [("b158", False), ("b158", True), ("v2_a8", False), ("v2_a4", False),
                                               ("bf16", False)])
def test_export_on_gpu_gives_the_project_logits(tmp_path, precision, latent):
    cfg = eu.run_config(precision)
    res = run_ranks(eu.export_worker, 1, cfg, str(tmp_path / "run"), str(tmp_path / "hf"), None, latent, None, (),
                    "cuda")[0]
    assert res["device"].startswith("cuda")
    print(f"{precision} latent={latent}: max|diff| {res['max_diff']:.3g}, argmax equal {res['argmax_equal']}, "
          f"{res['class']} / {res['q_proj']}")
    assert res["argmax_equal"] and res["max_diff"] <= 1e-4, res
    if precision == "b158":
        assert res["class"] == "BitNetForCausalLM" and res["q_proj"] == "AutoBitLinear"
        assert res["online"] is latent
        if not latent:
            assert res["q_weight_values"] == [-1.0, 0.0, 1.0]  # the packed weights, unpacked on the GPU


@pytest.mark.parametrize("precision", ["b158", "v2_a4"])
def test_generate_on_gpu(tmp_path, precision):
    res = run_ranks(eu.gpu_generate_worker, 1, eu.run_config(precision), str(tmp_path / "run"))[0]
    assert res["device"].startswith("cuda")
    assert res["ours"] == res["hf"], res
    assert len(res["sampled"]) >= 20
