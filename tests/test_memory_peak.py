"""The memory-peak replay: live blocks at the peak of a hand-made alloc/free history, grouped by site."""

from experiments.memory_peak import by_site, innermost, live_at_peak, site

REPO = [{"filename": "/x/torch/nn/modules/module.py", "line": 5, "name": "to"},
        {"filename": "/x/spmoe/offload/cache.py", "line": 40, "name": "__init__"}]
OTHER = [{"filename": "/x/torch/cuda/graphs.py", "line": 9, "name": "capture_end"}]


def _alloc(addr, size, frames=REPO):
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def _free(addr, action="free_completed"):
    return {"action": action, "addr": addr}


def test_site_is_the_innermost_repository_frame_else_the_innermost():
    assert site(REPO) == "cache.py:40 __init__"
    assert site(OTHER) == "graphs.py:9 capture_end"
    assert site([]) == "?"


def test_peak_keeps_the_blocks_live_at_the_highest_total():
    events = [_alloc(1, 100), _alloc(2, 50, OTHER), _free(1, "free_requested"), _free(1),
              _alloc(3, 120), _free(2), _alloc(4, 10)]
    peak, blocks = live_at_peak(events)
    assert peak == 170  # blocks 2 and 3; block 1 was freed (completed) before 3, and 4 came after 2's free
    assert sorted(blocks) == [2, 3]
    df = by_site(blocks)
    assert list(df["site"]) == ["cache.py:40 __init__", "graphs.py:9 capture_end"]
    assert list(df["bytes"]) == [120, 50] and list(df["blocks"]) == [1, 1]


def test_a_free_requested_block_counts_until_its_free_completes():
    peak, blocks = live_at_peak([_alloc(1, 100), _free(1, "free_requested"), _alloc(2, 100), _free(1)])
    assert peak == 200 and sorted(blocks) == [1, 2]


def test_a_site_breaks_down_by_innermost_frame():
    deep = [{"filename": "/x/transformers/mixtral.py", "line": 7, "name": "forward"}] + REPO
    _, blocks = live_at_peak([_alloc(1, 30, deep), _alloc(2, 20, REPO), _alloc(3, 5, deep)])
    df = by_site(blocks, innermost)
    assert list(df["site"]) == ["mixtral.py:7 forward", "module.py:5 to"]
    assert list(df["bytes"]) == [35, 20] and list(df["blocks"]) == [2, 1]


def test_without_cuda_it_says_what_it_needs():
    import pytest
    import torch

    from experiments.memory_peak import main
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit, match="needs CUDA"):
        main(["model=tiny"])
