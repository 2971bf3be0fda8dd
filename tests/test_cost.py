"""clip_jax.cost: the collectives counted in a compiled module's HLO text, and the search for
the largest size that fits (the FLOP counts are checked through the aot and benchmark
commands: tests/test_aot.py, tests/test_cli_tools.py)."""
import textwrap

import pytest

from clip_jax import cost

# A compiled module in the TPU compiler's notation: an async all-gather, a tuple all-reduce
# with /*index=N*/ markers, a loop of 3 known trips holding a reduce-scatter and a permute,
# a loop bounded by its condition holding an all-gather, a conditional whose branches
# hold an all-reduce each, the continuation of an all-gather (not counted again), and a
# reduce-scatter as v5e's libtpu emits one: an all-reduce + slice fused as `all-reduce-scatter`.
HLO = textwrap.dedent("""\
    HloModule m, entry_computation_layout={()->()}

    %add (a: f32[], b: f32[]) -> f32[] {
      %a = f32[] parameter(0)
      %b = f32[] parameter(1)
      ROOT %s = f32[] add(%a, %b)
    }

    %body (p: (s32[], f32[64,8])) -> (s32[], f32[64,8]) {
      %p = (s32[], f32[64,8]{1,0}) parameter(0)
      %x = f32[64,8]{1,0:T(8,128)} get-tuple-element(%p), index=1
      %rs = f32[16,8]{1,0} reduce-scatter(%x), channel_id=3, dimensions={0}, to_apply=%add
      %y = bf16[16,8]{1,0} convert(%rs)
      %cp = bf16[16,8]{1,0} collective-permute(%y), channel_id=4, source_target_pairs={{0,1}}
      %dsend = (f32[1,8,128]{2,1,0}, u32[], token[]) send(%z, %tok), channel_id=9, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.4_0",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
      %drecv = (f32[1,8,128]{2,1,0}, u32[], token[]) recv(%tok), channel_id=10, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.4_0",_xla_megascale_transfer_type="ALL_REDUCE"}
      ROOT %t = (s32[], f32[64,8]{1,0}) tuple(%i, %x)
    }

    %cond (p: (s32[], f32[64,8])) -> pred[] {
      %p = (s32[], f32[64,8]{1,0}) parameter(0)
      ROOT %lt = pred[] compare(%i, %n), direction=LT
    }

    %body2 (p2: (s32[], f32[64,8])) -> (s32[], f32[64,8]) {
      %p2 = (s32[], f32[64,8]{1,0}) parameter(0)
      %x2 = f32[64,8]{1,0} get-tuple-element(%p2), index=1
      %ag2 = f32[256,8]{1,0} all-gather(%x2), channel_id=7, dimensions={0}
      ROOT %t2 = (s32[], f32[64,8]{1,0}) tuple(%i2, %x2)
    }

    %cond2 (p2: (s32[], f32[64,8])) -> pred[] {
      %c5 = s32[]{:T(128)} constant(5)
      %p2 = (s32[], f32[64,8]{1,0}) parameter(0)
      %i2 = s32[]{:T(128)} get-tuple-element(%p2), index=0
      ROOT %lt2 = pred[]{:T(512)} compare(%i2, %c5), direction=LT
    }

    %branch (q: f32[32]) -> f32[32] {
      %q = f32[32]{0} parameter(0)
      ROOT %ar2 = f32[32]{0} all-reduce(%q), channel_id=5, to_apply=%add
    }

    %async_collective_fusion.1 (s: bf16[4,16]) -> bf16[16,16] {
      %s = bf16[4,16]{1,0} parameter(0)
      ROOT %ag_piece = bf16[16,16]{1,0} all-gather(%s), channel_id=1, dimensions={0}, frontend_attributes={chain_id="0"}
    }

    %all-reduce-scatter.8 (input_0: f32[32,8]) -> f32[8,8] {
      %input_0 = f32[32,8]{1,0:T(8,128)S(1)} parameter(0)
      %all-reduce.96 = f32[32,8]{1,0:T(8,128)} all-reduce(%input_0), channel_id=8, to_apply=%add
      ROOT %slice = f32[8,8]{1,0} dynamic-slice(%all-reduce.96, %offset, %zero), dynamic_slice_sizes={8,8}
    }

    %other_branch (q: f32[32]) -> f32[32] {
      %q2 = f32[32]{0} parameter(0)
      ROOT %ar3 = f32[32]{0} all-reduce(%q2), channel_id=6, to_apply=%add
    }

    ENTRY %main (a: bf16[4,16], b: f32[10], c: f32[6]) -> f32[] {
      %a = bf16[4,16]{1,0:T(8,128)(2,1)} parameter(0)
      %b = f32[10]{0} parameter(1)
      %c = f32[6]{0} parameter(2)
      %ag = (bf16[4,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(%a), channel_id=1, dimensions={0}
      %agd = bf16[16,16]{1,0} all-gather-done(%ag)
      %piece = bf16[16,16]{1,0} fusion(%a), kind=kOutput, calls=%async_collective_fusion.1, backend_config={"continuation_config":{"operand_original_start":"0"}}
      %ar = (f32[10]{0}, f32[6]{0}) all-reduce(%b, /*index=1*/%c), channel_id=2, to_apply=%add
      %gsend = (f32[8,32]{1,0}, u32[], token[]) send(%e, %tok), channel_id=11, is_host_transfer=true, frontend_attributes={_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_GATHER"}
      %grecv = (f32[16,32]{1,0}, u32[], token[]) recv(%tok), channel_id=12, is_host_transfer=true, frontend_attributes={_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_GATHER"}
      %psend = (bf16[8,32]{1,0}, u32[], token[]) send(%f, %tok), channel_id=13, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ONE_TO_ONE"}
      %precv = (bf16[8,32]{1,0}, u32[], token[]) recv(%tok), channel_id=14, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ONE_TO_ONE"}
      %w = (s32[], f32[64,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
      %w2 = (s32[], f32[64,8]{1,0}) while(%init), condition=%cond2, body=%body2
      %g = f32[32,8]{1,0} parameter(3)
      %fused_rs = f32[8,8]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.8
      %k = f32[32]{0} conditional(%pred, %v, %v), branch_computations={%branch, %other_branch}
      ROOT %r = f32[] constant(0)
    }
    """)


def test_collective_bytes_weighs_loops_and_counts_each_kind_once():
    got = cost.collective_bytes(HLO)
    ici = {kind: {k: got[kind][k] for k in ("count", "bytes")} for kind in got}
    # The gathered results: the async one, and 5 trips of a loop whose bound is only in its
    # condition (`counter < 5`, as the TPU compiler leaves a scan).
    assert ici["all-gather"] == {"count": 1 + 5, "bytes": 16 * 16 * 2 + 5 * 256 * 8 * 4}
    # Its input, 3 trips; and the fused all-reduce-scatter's input, once.
    assert ici["reduce-scatter"] == {"count": 3 + 1, "bytes": 3 * 64 * 8 * 4 + 32 * 8 * 4}
    assert ici["collective-permute"] == {"count": 3, "bytes": 3 * 16 * 8 * 2}
    # The tuple all-reduce (both operands), and each of the conditional's two branches once.
    assert ici["all-reduce"] == {"count": 3, "bytes": (10 + 6) * 4 + 2 * 32 * 4}
    assert ici["all-to-all"] == {"count": 0, "bytes": 0}


def test_collective_bytes_counts_the_transfers_between_slices_apart():
    """A multi-slice TPU program's DCN collectives are send/recv pairs to the Megascale
    runtime: counted apart, as the kind they implement (a gather's recv, every other kind's
    send), weighted by their loop's trips; nothing else is DCN."""
    dcn = {kind: (v["dcn_count"], v["dcn_bytes"]) for kind, v in cost.collective_bytes(HLO).items()}
    assert dcn["all-reduce"] == (3, 3 * 8 * 128 * 4)        # in the 3-trip loop, the send
    assert dcn["all-gather"] == (1, 16 * 32 * 4)            # the gathered result (recv)
    assert dcn["collective-permute"] == (1, 8 * 32 * 2)     # ONE_TO_ONE
    assert dcn["reduce-scatter"] == dcn["all-to-all"] == (0, 0)


def test_search_largest_brackets_the_limit_to_its_resolution():
    for limit in (0, 7, 8, 1000, 123_456):
        calls = []

        def fits(n):
            calls.append(n)
            return n <= limit

        largest, tried = cost.search_largest(fits, unit=8, start=64)
        assert largest % 8 == 0 and largest <= limit
        assert limit - largest < max(8, largest // 16) + 8, (limit, largest)
        assert all(tried[n] == (n <= limit) for n in tried) and len(calls) == len(tried)
    assert cost.search_largest(lambda n: True, unit=8, start=64, limit=200)[0] == 200 // 8 * 8


def test_memory_guided_search_finds_the_same_limit_in_fewer_compiles():
    """Memory growing linearly plus a B_local x B term (the clip loss's logits): the guided
    search lands within the resolution of the true limit in fewer tries than bisection, and
    a misleading guess costs extra tries, never a wrong answer."""
    unit, budget = 256, 16.0
    memory = lambda n: 2.0 + 1.1e-4 * n + 2e-11 * n * n         # GiB at global batch n
    truth = max(n for n in range(unit, 400_000, unit) if memory(n) <= budget)

    def search(guess_kind):
        points = []

        def fits(n):
            points.append((n, memory(n)))
            return memory(n) <= budget

        guess = {"memory": lambda lo, hi: cost.memory_guess(points, budget),
                 "too_high": lambda lo, hi: 10 ** 9, "too_low": lambda lo, hi: 1,
                 "none": None}[guess_kind]
        largest, tried = cost.search_largest(fits, unit, 32_768, resolution=16, guess=guess)
        assert memory(largest) <= budget and truth - largest <= max(unit, largest // 16), guess_kind
        assert all(ok == (memory(n) <= budget) for n, ok in tried.items())
        return len(tried)

    bisection = search("none")
    assert search("memory") < bisection, (search("memory"), bisection)
    for kind in ("too_high", "too_low"):
        assert search(kind) <= bisection + 3
    assert cost.memory_guess([(1, 1.0)], budget) is None
    assert cost.memory_guess([(1, 1.0), (2, 2.0)], 4.0) == pytest.approx(4.0)
    # the last fit and the first over budget, not the two fits: 2 + (4 - 2) / ((20 - 2) / 6)
    assert cost.memory_guess([(1, 1.0), (2, 2.0), (8, 20.0)], 4.0) == pytest.approx(2 + 2 / 3)
