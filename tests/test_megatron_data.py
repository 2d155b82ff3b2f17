"""megatron GPTDataset glue (bitnet_dist.engines.megatron_data): blends, splits, the empty-split error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitnet_dist.config import TrainConfig
from bitnet_dist.engines import megatron_data as md
from bitnet_dist.errors import ConfigError

EOD = 0


@pytest.fixture(autouse=True, scope="module")
def one_process_group():
    """megatron's dataset builders synchronize through torch.distributed (rank 0 builds the cache)."""
    import torch.distributed as dist

    from bitnet_dist.engines.common import ensure_process_group

    created = not dist.is_initialized()
    ensure_process_group(torch.device("cpu"))
    yield
    if created:
        dist.destroy_process_group()


def write_indexed(prefix, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for d in docs:
        b.add_document(torch.tensor(d, dtype=torch.int32), [len(d)])
    b.finalize(str(prefix) + ".idx")


def make_docs(n, seed, lo=5, hi=40, vocab=100):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, vocab, rng.integers(lo, hi))) + [EOD] for _ in range(n)]


def cfg_for(paths, valid_fraction=0.1, valid_paths=(), seq=16):
    cfg = TrainConfig()
    cfg.data.name = "indexed"
    cfg.data.paths = list(paths)
    cfg.data.valid_paths = list(valid_paths)
    cfg.data.valid_fraction = valid_fraction
    cfg.trainer.seq_length = seq
    return cfg


def test_parse_blend():
    assert md.parse_blend(["/a"]) == (["/a"], None)
    assert md.parse_blend([0.7, "/a", 0.3, "/b"]) == (["/a", "/b"], [0.7, 0.3])
    assert md.parse_blend(["0.5", "/a", "0.5", "/b"]) == (["/a", "/b"], [0.5, 0.5])
    with pytest.raises(ConfigError, match="data.paths"):
        md.parse_blend([0.7, "/a", "/b"])
    with pytest.raises(ConfigError, match="data.paths"):
        md.parse_blend([])


def test_split_ranges_match_megatron():
    # megatron's own rounding: 200 docs at 949,50,1 -> 190 / 10 / 0 (the test split rounds to nothing)
    r = md._split_ranges(200, [0.949, 0.05, 0.001])
    assert r == [(0, 190), (190, 200), (200, 200)]


def test_blended_dataset_samples_are_the_documents(tmp_path):
    """Every training sample is a window of the concatenated documents: labels = tokens shifted by one."""
    docs_a, docs_b = make_docs(60, 1), make_docs(40, 2)
    write_indexed(tmp_path / "a", docs_a)
    write_indexed(tmp_path / "b", docs_b)
    cfg = cfg_for([0.5, str(tmp_path / "a"), 0.5, str(tmp_path / "b")])
    tok = md.DatasetTokenizer(100, EOD)
    train, valid, test = md.build_gpt_datasets(cfg, tok, num_samples=[64, 8], cache_dir=tmp_path / "cache")
    assert test is None and len(train) >= 64 and len(valid) >= 8
    s = train[0]
    assert np.array_equal(np.asarray(s["tokens"][1:]), np.asarray(s["labels"][:-1]))
    stream = md.GPTTrainStream(train, micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2)
    step = stream.next_step()
    assert len(step) == 2 and step[0]["tokens"].shape == (2, 16) and step[0]["loss_mask"].dtype == torch.float32
    # the global batch does not depend on the DP size: rank 1 of DP=2 holds samples 2,3 of micro-step 0
    other = md.GPTTrainStream(train, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2).next_step()
    solo = md.GPTTrainStream(train, micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=1).next_step()
    assert torch.equal(solo[1]["tokens"], other[0]["tokens"])
    # resume exactly
    st = stream.state_dict()
    nxt = stream.next_step()
    again = md.GPTTrainStream(train, micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2)
    again.load_state_dict(st)
    assert torch.equal(again.next_step()[1]["labels"], nxt[1]["labels"])
    assert torch.equal(md.valid_batches(valid, 2, micro_batch_size=2, dp_rank=0, dp_size=1)[0]["tokens"],
                       md.valid_batches(valid, 2, micro_batch_size=2, dp_rank=0, dp_size=1)[0]["tokens"])
    assert any((tmp_path / "cache").iterdir())  # indices cached


def test_empty_validation_split_is_a_clear_error_not_a_hang(tmp_path):
    write_indexed(tmp_path / "few", make_docs(8, 3))
    cfg = cfg_for([str(tmp_path / "few")], valid_fraction=0.05)  # 0.05 * 8 docs rounds to 0
    with pytest.raises(ConfigError, match=r"data.valid_fraction.*valid split.*8 documents"):
        md.build_gpt_datasets(cfg, md.DatasetTokenizer(100, EOD), num_samples=[16, 4, None],
                              cache_dir=tmp_path / "cache")


def test_missing_files_name_the_fix(tmp_path):
    from bitnet_dist.data.errors import DataError

    cfg = cfg_for([str(tmp_path / "nothing")])
    with pytest.raises(DataError, match="bitnet-preprocess"):
        md.build_gpt_datasets(cfg, md.DatasetTokenizer(100, EOD), num_samples=[16, 4, None])


def test_separate_validation_files(tmp_path):
    write_indexed(tmp_path / "tr", make_docs(30, 4))
    write_indexed(tmp_path / "va", make_docs(10, 5))
    cfg = cfg_for([str(tmp_path / "tr")], valid_paths=[str(tmp_path / "va")])
    train, valid, _ = md.build_gpt_datasets(cfg, md.DatasetTokenizer(100, EOD), num_samples=[20, 4, None],
                                            cache_dir=tmp_path / "c")
    va_tokens = set(int(x) for d in make_docs(10, 5) for x in d)
    assert set(np.asarray(valid[0]["tokens"]).tolist()) <= va_tokens
