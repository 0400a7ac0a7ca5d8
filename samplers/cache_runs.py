"""What each Quickstep cache does within one sampling run, in plain torch (no host import): DeepCache's partial-step
plan, the Block Cache's per-block protocol and the model-level cache's whole-output forecast. Each is a RunState
(samplers/caching.py) built from a layout and one CacheConfig; nodes/caching.py calls them from the host's patch
points.

torch.compile: the Block Cache's and the model cache's bookkeeping (sigma, history, policy decisions: Python
control flow on tensor values) is excluded from Dynamo with torch._dynamo.disable, so Dynamo never traces it and
never specialises on a block's position; the host blocks themselves still compile (nodes/caching.py skips only the
patch frame, not what it calls).
"""
import math

import torch
import torch._dynamo

from .caching import RunState, full_steps, relative_l1


class DeepCacheRun(RunState):
    """DeepCache: `full` holds the steps that run the whole UNet (calibrated, or 1 in `interval` on the uniform or
    non-uniform schedule inside the window); the node's wrappers run the shallow branch on the others."""

    def __init__(self, config, layout, sigmas, start_sigma, end_sigma, storage=None):
        super().__init__("DeepCache", sigmas, config, start_sigma, end_sigma, storage)
        self.layout, self.branch, self.blocks = layout, layout["branch"], layout["unet_blocks"]
        window = [i for i in range(self.steps) if end_sigma < self.sigmas[i] <= start_sigma]
        start, end = (window[0], window[-1] + 1) if window else (self.steps, self.steps)
        if self.few_step:
            self.full = set(range(self.steps))
        elif self.planned is not None:
            self.full = set(self.planned)
        else:
            self.full = set(full_steps(self.steps, layout["interval"], layout["schedule"], start, end))
        self.transformer_index = None
        self.partial_calls = 0

    def finish(self):
        calls, full, _ = self.totals()
        schedule = self.plan_text() if self.few_step or self.planned is not None else self.layout["schedule"]
        line = (f"DeepCache: {full}/{calls} model calls ran the whole UNet, {self.partial_calls} partial "
                f"(branch {self.branch}, interval {self.layout['interval']}, {schedule}, "
                f"{self.forecaster}) over {self.steps} steps; {self.memory_text()}")
        return self.summary(line, calls, computed=full, partial=self.partial_calls)


def streams(d, clone=False):
    """The hidden-state streams of a block's args or output ("img", and "txt" for double-stream blocks). The host's
    blocks update their inputs in place (img += ...), so inputs kept across a block are cloned."""
    return {k: (d[k].clone() if clone and d[k] is not None else d[k])
            for k in ("img", "txt") if k in d and (torch.is_tensor(d[k]) or d[k] is None)}


class BlockCacheRun(RunState):
    """Dual-block cache over a DiT's block sequence. `segments[pos]`: the segment of block pos (blocks of one segment
    share their streams: Flux's double blocks carry img and txt, its single blocks one joined stream). The first
    `front` blocks always run and their residual is the probe; the middle blocks run or are replaced by the
    forecast of their residual per segment and stream; the last `back` blocks always run.

    Per block the node calls enter(pos, args, sigma, uuids) -> run it?, then leave(pos, out) after running it or
    skipped(pos, args) instead."""

    def __init__(self, config, layout, sigmas, start_sigma, end_sigma, storage=None):
        super().__init__("BlockCache", sigmas, config, start_sigma, end_sigma, storage)
        self.layout = layout
        self.segments = layout["segments"]
        self.front, self.back = layout["front"], layout["back"]
        self.n = len(self.segments)
        self.mid_lo, self.mid_hi = self.front, self.n - self.back
        self.blocks_run = 0
        self.blocks_total = 0

    @torch._dynamo.disable
    def enter(self, pos, args, sigma_of, uuids):
        """Bookkeeping before block `pos`; True when the block must run. `sigma_of()` reads the call's sigma."""
        seg = self.segments[pos]
        if pos == 0 or self.current is None:
            sigma = sigma_of()
            group = self.group(uuids, args["img"])
            group.calls += 1
            self.current = {"group": group, "sigma": sigma, "step": self.step_of(sigma), "compute": True,
                            "probe_base": None, "mid_in": {}, "probe_seg": None}
        call = self.current
        self.blocks_total += 1
        if pos < self.mid_lo:
            if call["probe_seg"] != seg:
                call["probe_seg"], call["probe_base"] = seg, args["img"].clone()
        elif pos < self.mid_hi:
            if pos == self.mid_lo or self.segments[pos - 1] != seg:
                call["mid_in"][seg] = streams(args, clone=True)
            if not call["compute"]:
                return False
        self.blocks_run += 1
        return True

    @torch._dynamo.disable
    def leave(self, pos, out):
        """After block `pos` ran: the probe decision after the last front block, the middle's residuals stored
        after the last middle block of each segment."""
        call = self.current
        seg = self.segments[pos]
        if pos == self.mid_lo - 1:
            self._decide(call, out["img"] - call["probe_base"])
        elif self.mid_lo <= pos < self.mid_hi and self._segment_ends(pos):
            group, sigma = call["group"], call["sigma"]
            for k, v in streams(out).items():
                start = call["mid_in"][seg].get(k)
                value = None if (v is None or start is None) else (v - start)
                site = self.site(group, f"{seg}:{k}")
                if k == "img" and pos == self.mid_hi - 1:          # the residual entering the back blocks
                    self.record_magnitude(site, sigma, value, channel_dim=-1)
                site.push(sigma, value)
            self.note_memory()
        self._end_of_call(pos)
        return out

    @torch._dynamo.disable
    def skipped(self, pos, args):
        """The output of a skipped middle block: its input, and at the end of a segment the segment's input plus
        the forecast residual."""
        call = self.current
        seg = self.segments[pos]
        if not self._segment_ends(pos):
            out = streams(args)
        else:
            group, sigma = call["group"], call["sigma"]
            out = {}
            for k, start in call["mid_in"][seg].items():
                site = group.sites.get(f"{seg}:{k}")
                pred = site.predict(sigma) if site is not None and site.values[-1] is not None else None
                out[k] = None if pred is None or start is None else start + pred.to(start)
                if k == "img" and pos == self.mid_hi - 1:
                    group.forecast_points += site.points_used
        self._end_of_call(pos)
        return out

    def _segment_ends(self, pos):
        return pos == self.mid_hi - 1 or self.segments[pos + 1] != self.segments[pos]

    def _end_of_call(self, pos):
        if pos == self.n - 1:
            self.current = None

    def _decide(self, call, probe):
        group, sigma = call["group"], call["sigma"]
        site = self.site(group, "probe")
        middle_ready = len(group.sites) > 1 and all(len(f) for name, f in group.sites.items() if name != "probe")
        if not (len(site) and middle_ready):           # nothing to forecast from yet
            compute = True
            group.consecutive = 0
            group.computed += 1
        else:
            def change():
                pred = site.predict(sigma)
                return relative_l1(probe, pred) if pred.shape == probe.shape else math.inf
            compute = self.should_compute(group, call["step"], sigma, change)
        call["compute"] = compute
        if compute:
            site.push(sigma, probe.detach())

    def finish(self):
        calls, computed, fc = self.totals()
        cached = calls - computed
        ratio = self.blocks_total / self.blocks_run if self.blocks_run else 1.0
        line = (f"BlockCache F{self.front}B{self.back} ({self.plan_text()}): computed {computed}/{calls} model calls "
                f"over {self.steps} steps, {cached} cached"
                + (f" ({self.forecaster} forecast from {fc / cached:.1f} points avg)"
                   if cached and self.forecaster != "reuse" else "")
                + f", blocks run {self.blocks_run}/{self.blocks_total} ({ratio:.2f}x less block compute), "
                f"{self.memory_text()}")
        return self.summary(line, calls, computed=computed, blocks_run=self.blocks_run,
                            blocks_total=self.blocks_total)


class ModelCacheRun(RunState):
    """Model-level forecasting cache for any diffusion model: the cached tensor is the model's denoised prediction
    (x0), read where the host's apply_model returns it. A skipped call returns forecast(x0) and runs nothing; x is
    never modified. x0 moves slowly along a run for every parameterisation, where the output minus its input (what
    EasyCache caches) does not on an eps model: chosen on the two pixel digit UNets (eps at threshold 0.2: 2.00x
    compute at 36.0 dB against the residual's 1.20x at 40.7; flow: 3.00x at 36.5 against 36.2 dB).

    Residual-probe policy without a probe block (EasyCache's input-change rule): x0 is predicted to move by
    k * relative_l1(x, x at the last computed call), x the model's input (calculate_input), k = (x0 change) /
    (input change) between the last two computed calls; a call is skipped while that stays under the threshold.
    Calibrated policy: the planned steps of x0's magnitude curve.

    The node's run-length cap and window end (at most 2 skipped in a row, caching to the last step) were chosen on
    the same two tuning UNets over 3 noise seeds and checked on 9 (bench.caching --tune-model-cache): 3 in a row put
    a flow seed at 26 dB whatever the threshold (on flow the rule reads small x0 changes over the first steps, which
    still steer the trajectory), and a window ending at 95% of the denoising kept the eps UNet's last 6 karras steps
    computing with no PSNR to show for it."""

    def __init__(self, config, layout, sigmas, start_sigma, end_sigma, storage=None):
        super().__init__("ModelCache", sigmas, config, start_sigma, end_sigma, storage)
        self.layout = layout
        self.skipped_calls = 0

    @torch._dynamo.disable
    def lookup(self, x, sigma, uuids):
        """The forecast x0 for this call, or None when the model must run (then call store)."""
        group = self.group(uuids, x)
        group.calls += 1
        site = self.site(group, "denoised")
        self.current = {"group": group, "sigma": sigma}
        if not len(site) or (self.planned is None and "k" not in group.scratch):     # nothing to go on yet
            group.consecutive = 0
            group.computed += 1
            return None

        def change():
            return group.scratch["k"] * relative_l1(x, group.scratch["x"].to(x.device))
        if self.should_compute(group, self.step_of(sigma), sigma, change):
            return None
        self.skipped_calls += 1
        pred = site.predict(sigma)
        group.forecast_points += site.points_used
        return pred.to(x)

    @torch._dynamo.disable
    def store(self, x, denoised):
        call, self.current = self.current, None
        group, sigma = call["group"], call["sigma"]
        site = self.site(group, "denoised")
        if len(site) and "x" in group.scratch:
            dx = relative_l1(x, group.scratch["x"].to(x.device))
            dd = relative_l1(denoised, site.values[-1].to(denoised.device))
            if dx > 0 and math.isfinite(dd):
                group.scratch["k"] = dd / dx
        self.record_magnitude(site, sigma, denoised, channel_dim=1)
        site.push(sigma, denoised.detach())
        group.scratch["x"] = x.detach().to(self.storage) if self.storage is not None else x.detach().clone()
        self.note_memory()
        return denoised

    def finish(self):
        calls, computed, fc = self.totals()
        line = (f"ModelCache ({self.plan_text()}): ran the model on {calls - self.skipped_calls}/{calls} calls over "
                f"{self.steps} steps, {self.skipped_calls} forecast"
                + (f" ({self.forecaster} from {fc / self.skipped_calls:.1f} points avg)"
                   if self.skipped_calls and self.forecaster != "reuse" else "")
                + f"; {self.memory_text()}")
        return self.summary(line, calls, computed=calls - self.skipped_calls)
