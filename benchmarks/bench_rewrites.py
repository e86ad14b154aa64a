"""What each inference rewrite of bsafuse/model/speed.py gives: the network with one rewrite left
out at a time (its earlier form restored), all timed interleaved in one process against the
reference path; `x_reference` as in bench_fuse.py. Random weights, 256 x 256.

    python benchmarks/bench_rewrites.py                  # paper config, batch 1
    python benchmarks/bench_rewrites.py --config small --batch 8

The earlier forms below are the ones the rewrites replaced (2026-12-02); they patch the model's
classes while their variant runs and put the current forms back after. Never run as a test.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from typing import Any

from _common import interleaved, output, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("paper", "small"), default="paper")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    facts = setup(threads=args.threads, tune=True)
    import torch
    from bench_fuse import build, pair

    paths = build(args.config)
    variants = _variants(paths["optimised"].net)
    moving, fixed = pair(args.batch, 256)
    calls: dict[str, Callable[[], object]] = {"reference": functools.partial(paths["reference"], moving, fixed)}
    calls.update({name: functools.partial(fn, moving, fixed) for name, fn in variants.items()})
    with torch.inference_mode():
        times = interleaved(calls, rounds=args.rounds, reps=2 if args.batch == 1 else 1)
    reference = statistics.median(times["reference"])
    rows = [
        {"variant": name, "median_s": statistics.median(t), "x_reference": reference / statistics.median(t)}
        for name, t in times.items()
    ]
    facts.update(config=args.config, batch=args.batch)
    output(rows, facts, title=f"rewrites left out one at a time, {args.config}, batch {args.batch}", as_json=False)
    return 0


def _variants(net: Any) -> dict[str, Callable[[Any, Any], Any]]:
    import torch
    import torch.nn.functional as F
    from einops import rearrange

    from bsafuse.model import align, blocks, composed_conv

    def attention_before(self: Any, x: Any) -> Any:  # q, k normalised copies, then the projection
        h, w = x.shape[-2:]
        (qkv,) = composed_conv.pointwise_then_spatial(x, self.qkv, self.qkv_spatial)
        q, k, v = rearrange(qkv, "n (three g c) h w -> three n g c (h w)", three=3, g=self.heads)
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.temperature.float(), dim=-1)
        out = rearrange(v.transpose(-2, -1) @ attn.transpose(-2, -1), "n g (h w) c -> n h w (g c)", h=h, w=w)
        return self.project(out.permute(0, 3, 1, 2))

    def feed_forward_before(self: Any, x: Any) -> Any:  # one conv with an all-ones channel, halves strided
        ones = x.new_ones((x.shape[0], 1, *x.shape[-2:]))
        kernel = composed_conv.composed_kernel(self.expand, self.spatial)
        a, b = F.conv2d(torch.cat((x, ones), 1), kernel, self.spatial.bias, padding=1).chunk(2, 1)
        return self.project(F.gelu(a) * b)

    def layer_norm_before(x: Any, weight: Any, bias: Any, eps: float) -> Any:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps).permute(0, 3, 1, 2)

    def amax_before(x: Any) -> Any:
        return x.amax(dim=(-2, -1), keepdim=True)

    now = {
        "attention": blocks.ChannelAttention.forward,
        "feed_forward": blocks.GatedFeedForward.forward,
        "layer_norm": blocks.layer_norm_channels,
        "amax": align.spatial_amax,
    }
    before = {
        "attention": attention_before,
        "feed_forward": feed_forward_before,
        "layer_norm": layer_norm_before,
        "amax": amax_before,
    }

    def install(forms: dict[str, Any]) -> None:
        blocks.ChannelAttention.forward = forms["attention"]
        blocks.GatedFeedForward.forward = forms["feed_forward"]
        blocks.layer_norm_channels, align.spatial_amax = forms["layer_norm"], forms["amax"]

    def variant(*old: str, scores: bool = False) -> Callable[[Any, Any], Any]:
        forms = {k: (before if k in old else now)[k] for k in now}

        def call(moving: Any, fixed: Any) -> Any:
            install(forms)
            try:
                return net(moving, fixed, transfer_scores=scores)
            finally:
                install(now)

        return call

    return {
        "all rewrites": variant(),
        "without the Gram-matrix channel attention": variant("attention"),
        "without the split feed-forward convolutions": variant("feed_forward"),
        "without the few-channel LayerNorm in NCHW": variant("layer_norm"),
        "without the spatial maxima in two steps": variant("amax"),
        "with the frozen classifier's transfer scores": variant(scores=True),
        "none of the five": variant("attention", "feed_forward", "layer_norm", "amax", scores=True),
    }


if __name__ == "__main__":
    raise SystemExit(main())
