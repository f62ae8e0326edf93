"""Decode attention over the KV cache: each running row's token attends over its own row only, eager steps in groups
of rows about as long (``DecodeGroups``), compiled steps block by block (``DecodeBlocks``); both equal plain
attention over the row, in every K/V layout. Pure tensor logic, no model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from predictor.engine.model.falcon import DECODE_BLOCK, decode_blocks, decode_groups
from predictor.engine.model.kv_cache import LayerCache, to_fp8

CPU = torch.device("cpu")
CAPACITY = 2048
DIM = 16
ROWS = 12
# (cache row, position of the new token): lengths across every group, rows out of order and apart
RUNNING = [(9, 3), (2, 70), (5, 1500), (0, 130), (7, 63), (3, 64), (11, 0), (4, 2047), (1, 129), (8, 700)]


def _cache(kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(kv_heads)
    shape = (ROWS + 1, kv_heads, CAPACITY, DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _layer(keys: torch.Tensor, values: torch.Tensor) -> LayerCache:
    return LayerCache(keys, values, None, None, keys.dtype)


def _reference(keys, values, q, running, kv_heads):
    """Each token's softmax attention over its row's columns 0..position, K/V heads repeated to the query heads."""
    heads = q.shape[1]
    out = []
    for token, (row, position) in enumerate(running):
        k = keys[row, :, :position + 1].repeat_interleave(heads // kv_heads, 0)  # [heads, columns, dim]
        v = values[row, :, :position + 1].repeat_interleave(heads // kv_heads, 0)
        weights = ((k @ q[token][:, :, None]).squeeze(-1) * DIM**-0.5).softmax(-1)  # [heads, columns]
        out.append((weights[:, None, :] @ v).squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (8, 2), (8, 8)], ids=["multi-query", "grouped", "per-head"])
def test_eager_groups_and_compiled_blocks_equal_attention_over_the_own_row(heads, kv_heads):
    keys, values = _cache(kv_heads)
    q = torch.randn(len(RUNNING), heads, DIM, generator=torch.Generator().manual_seed(7))
    shape = SimpleNamespace(heads=heads, kv_heads=kv_heads)
    rows, positions = [row for row, _ in RUNNING], [position for _, position in RUNNING]
    expected = _reference(keys, values, q, RUNNING, kv_heads)

    groups = decode_groups(positions, rows, CPU)
    torch.testing.assert_close(groups.attend(shape, _layer(keys, values), q), expected, atol=1e-5, rtol=1e-5)

    pairs = sum(position // DECODE_BLOCK + 1 for position in positions)
    blocks = decode_blocks(positions, rows, len(RUNNING) + 2, pairs + 5, ROWS, CPU)  # padded, as compiled
    padded_q = torch.cat((q, torch.zeros(2, heads, DIM)))
    torch.testing.assert_close(blocks.attend(shape, _layer(keys, values), padded_q)[:len(RUNNING)], expected,
                               atol=1e-5, rtol=1e-5)


def test_a_token_is_unchanged_by_what_runs_beside_it():
    keys, values = _cache(2)
    q = torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(3))
    shape = SimpleNamespace(heads=8, kv_heads=2)
    alone = decode_groups([40], [1], CPU).attend(shape, _layer(keys, values), q[:1])
    for neighbour in (10, 60):  # the same group: its width is the longer row's, the extra columns masked out
        beside = decode_groups([40, neighbour], [1, 6], CPU).attend(shape, _layer(keys, values), q)
        torch.testing.assert_close(beside[0], alone[0], atol=1e-6, rtol=1e-6)
    beside = decode_groups([40, 1900], [1, 6], CPU).attend(shape, _layer(keys, values), q)  # another group: untouched
    assert torch.equal(beside[0], alone[0])


def test_a_row_reads_less_than_twice_its_columns_and_every_token_is_in_one_group():
    positions = list(range(0, CAPACITY, 7))
    rows = list(range(len(positions)))[::-1]
    plan = decode_groups(positions, rows, CPU)
    seen = []
    for group in plan.groups:
        width = group.mask.shape[1]
        for token in group.tokens.tolist():
            columns = positions[token] + 1
            assert width >= columns and (width <= DECODE_BLOCK or width < 2 * columns), (columns, width)
            seen.append(token)
    assert sorted(seen) == list(range(len(positions))) and plan.tokens == len(positions)
    assert len(plan.groups) == (CAPACITY // DECODE_BLOCK).bit_length()  # 64, 128, ..., 2048 columns


def test_consecutive_rows_are_read_in_place_and_others_gathered():
    plan = decode_groups([10, 20, 30, 40], [6, 4, 5, 7], CPU)
    (group,) = plan.groups
    assert group.rows == slice(4, 8) and group.tokens.tolist() == [1, 2, 0, 3]  # tokens in their rows' order
    (apart,) = decode_groups([10, 20], [2, 9], CPU).groups
    assert apart.rows.tolist() == [2, 9]


@pytest.mark.parametrize("plan", ["groups", "blocks"])
def test_an_fp8_cache_is_read_back_in_the_models_dtype(plan):
    """Keys and values stored as fp8 with a scale per token and head: attention over them equals attention over
    what they round to, and is within e4m3's rounding (3 mantissa bits: 1/16 of a value at most, far less on
    average over a softmax) of attention over the unrounded ones."""
    heads, kv_heads = 8, 2
    keys, values = _cache(kv_heads)
    (k8, k_scale), (v8, v_scale) = to_fp8(keys), to_fp8(values)
    stored = LayerCache(k8, v8, k_scale, v_scale, torch.float32)
    rounded = _layer(*stored.read(slice(None), CAPACITY))
    q = torch.randn(len(RUNNING), heads, DIM, generator=torch.Generator().manual_seed(5))
    shape = SimpleNamespace(heads=heads, kv_heads=kv_heads)
    rows, positions = [row for row, _ in RUNNING], [position for _, position in RUNNING]
    if plan == "groups":
        attend = decode_groups(positions, rows, CPU).attend
        out, on_rounded = attend(shape, stored, q), attend(shape, rounded, q)
    else:
        pairs = sum(position // DECODE_BLOCK + 1 for position in positions)
        attend = decode_blocks(positions, rows, len(RUNNING), pairs, ROWS, CPU).attend
        out, on_rounded = attend(shape, stored, q), attend(shape, rounded, q)
    torch.testing.assert_close(out, on_rounded, atol=1e-5, rtol=1e-5)
    exact = _reference(keys, values, q, RUNNING, kv_heads)
    assert (out - exact).abs().max() < 0.1 and (out - exact).abs().mean() < 0.01
    assert k8.dtype == torch.float8_e4m3fn and k_scale.shape == keys.shape[:-1]
