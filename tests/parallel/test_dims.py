import pytest

from treadle.parallel.dims import ParallelDims


def test_dp_shard_is_inferred_from_the_world():
    dims = ParallelDims(dp_replicate=2, dp_shard=-1, cp=1, tp=2, world_size=8)
    assert dims.dp_shard == 2 and dims.dp_size == 4 and dims.fsdp_size == 2


def test_degrees_that_do_not_multiply_to_the_world_are_refused():
    with pytest.raises(
        ValueError, match=r"parallel.dp_replicate × dp_shard × cp × tp = 1×3×1×1 = 3 but the world size is 4"
    ):
        ParallelDims(dp_replicate=1, dp_shard=3, cp=1, tp=1, world_size=4)


def test_degrees_that_do_not_divide_the_world_are_refused():
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=4, world_size=6)


@pytest.mark.parametrize("axis", ["dp_replicate", "cp", "tp"])
def test_non_positive_degrees_are_refused(axis):
    kwargs = dict(dp_replicate=1, dp_shard=-1, cp=1, tp=1, world_size=2) | {axis: 0}
    with pytest.raises(ValueError, match=f"parallel.{axis}=0"):
        ParallelDims(**kwargs)


def test_expert_degree_must_divide_the_non_expert_ranks():
    with pytest.raises(
        ValueError, match=r"parallel.ep=3 must divide parallel.dp_shard × cp × tp = 4×1×1 = 4"
    ):
        ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, ep=3, world_size=4)


def test_pipeline_degree_takes_its_share_of_the_world():
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=2, world_size=4)
    assert (dims.pp, dims.dp_shard, dims.dp_size) == (2, 2, 2)


def test_pipeline_degree_counts_in_the_world():
    with pytest.raises(ValueError, match=r"parallel.pp × dp_replicate × cp × tp = 3×1×1×1 = 3"):
        ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=3, world_size=4)
