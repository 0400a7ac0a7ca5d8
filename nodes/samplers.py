"""Fast samplers in the host: every Quickstep sampler joins the stock sampler list as qs_<name> (so the plain KSampler
and KSamplerSelect offer it with good defaults), and SAMPLER nodes expose the options and the wrappers (UniC
corrector, PFDiff timestep skipping, Restart, parallel-in-time) for SamplerCustom / SamplerCustomAdvanced graphs.
"""
import functools

from comfy_api.latest import io

from .common import CATEGORY, QuickstepInputError, require_choice, require_finite
from .. import samplers as qs

PREFIX = "qs_"
SAMPLER_CATEGORY = f"{CATEGORY}/samplers"


def checked(label, fn):
    """`fn` with its sigmas and options checked first, errors naming `label` and the bad value."""
    @functools.wraps(fn)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        try:
            qs.validate_sigmas(sigmas)
            fn.validate(**options)
        except ValueError as error:
            raise QuickstepInputError(label, str(error)) from None
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
    return sampler


def register_in_host_lists():
    """Adds qs_<name> to the host's sampler lists (in place: the stock nodes' combos hold these very lists) and
    the matching sample_qs_<name> function where comfy.samplers.ksampler() looks samplers up."""
    import comfy.k_diffusion.sampling
    import comfy.samplers
    for name, fn in qs.SAMPLERS.items():
        host_name = PREFIX + name
        setattr(comfy.k_diffusion.sampling, f"sample_{host_name}", checked(f"sampler {host_name}", fn))
        for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
            if host_name not in names:
                names.append(host_name)


def sampler_object(label, fn, **options):
    import comfy.samplers
    try:
        fn.validate(**options)
    except ValueError as error:
        raise QuickstepInputError(label, str(error)) from None
    return comfy.samplers.KSAMPLER(checked(label, fn), extra_options=options)


def _lower_order_final():
    return io.Boolean.Input("lower_order_final", default=True,
                            tooltip="Lower the order on the last steps (more stable at few steps).")


class QuickstepDPMSolverPP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDPMSolverPP", display_name="DPM-Solver++", category=SAMPLER_CATEGORY,
            description="DPM-Solver++ (data prediction) multistep 2M/3M or singlestep 2S, exact for eps, v and "
                        "flow models (true log-SNR of the model's own sampling).",
            inputs=[io.Combo.Input("variant", options=["2m", "3m", "2s"], default="2m",
                                   tooltip="2M/3M: one model call per step; 2S: two per step."),
                    io.Combo.Input("solver_type", options=["midpoint", "taylor"], default="midpoint",
                                   tooltip="Second-order term of the multistep variants."),
                    _lower_order_final(),
                    io.Combo.Input("final_step", options=list(qs.FINAL_STEPS), default="denoised",
                                   tooltip="Last step to sigma 0: the denoised estimate, a second-order step "
                                           "(helps flow models at 8+ steps), or extrapolate (no model call at "
                                           "a small last sigma; see the Few-Step Sampler node).")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, variant, solver_type, lower_order_final, final_step):
        label = "DPM-Solver++"
        require_choice(label, "variant", variant, ("2m", "3m", "2s"))
        require_choice(label, "final_step", final_step, qs.FINAL_STEPS)
        if variant == "2s":
            return io.NodeOutput(sampler_object(label, qs.SAMPLERS["dpmpp_2s"]))
        require_choice(label, "solver_type", solver_type, ("midpoint", "taylor"))
        return io.NodeOutput(sampler_object(label, qs.SAMPLERS[f"dpmpp_{variant}"], solver_type=solver_type,
                                            lower_order_final=lower_order_final, final_step=final_step))


class QuickstepUniPC(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepUniPC", display_name="UniPC", category=SAMPLER_CATEGORY,
            description="UniPC predictor-corrector (bh1/bh2, order 1-3); the corrector reuses the next step's model "
                        "call, so one call per step.",
            inputs=[io.Combo.Input("variant", options=["bh1", "bh2"], default="bh2",
                                   tooltip="B(h) variant: bh2 for guided sampling, bh1 for unconditional."),
                    io.Int.Input("order", default=3, min=1, max=3, tooltip="Predictor order."),
                    io.Boolean.Input("use_corrector", default=True, tooltip="Apply the UniC corrector."),
                    _lower_order_final()],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, variant, order, use_corrector, lower_order_final):
        require_choice("UniPC", "variant", variant, ("bh1", "bh2"))
        return io.NodeOutput(sampler_object("UniPC", qs.SAMPLERS[f"unipc_{variant}"], order=order,
                                            use_corrector=use_corrector, lower_order_final=lower_order_final))


class QuickstepDEIS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDEIS", display_name="DEIS", category=SAMPLER_CATEGORY,
            description="DEIS multistep exponential integrator (tAB or rhoAB), orders 1-3.",
            inputs=[io.Int.Input("max_order", default=3, min=1, max=3, tooltip="Highest multistep order."),
                    io.Combo.Input("mode", options=["tab", "rhoab"], default="tab", tooltip="Polynomial in t or rho."),
                    _lower_order_final()],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, max_order, mode, lower_order_final):
        require_choice("DEIS", "mode", mode, ("tab", "rhoab"))
        return io.NodeOutput(sampler_object("DEIS", qs.SAMPLERS["deis"], max_order=max_order, mode=mode,
                                            lower_order_final=lower_order_final))


class QuickstepIPNDM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepIPNDM", display_name="iPNDM", category=SAMPLER_CATEGORY,
            description="Improved pseudo-numerical (Adams-Bashforth) sampler; iPNDM-v uses variable-step "
                        "coefficients for uneven schedules.",
            inputs=[io.Combo.Input("variant", options=["ipndm", "ipndm_v"], default="ipndm_v",
                                   tooltip="Fixed- or variable-step coefficients."),
                    io.Int.Input("max_order", default=4, min=1, max=4, tooltip="Highest multistep order.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, variant, max_order):
        require_choice("iPNDM", "variant", variant, ("ipndm", "ipndm_v"))
        return io.NodeOutput(sampler_object("iPNDM", qs.SAMPLERS[variant], max_order=max_order))


class QuickstepHeunEDM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepHeunEDM", display_name="Heun (EDM)", category=SAMPLER_CATEGORY,
            description="Heun's method (EDM Algorithm 2) with optional churn; the churn noise keeps the marginal "
                        "right on flow models too.",
            inputs=[io.Float.Input("s_churn", default=0.0, min=0.0, max=100.0, step=0.01, tooltip="Churn amount."),
                    io.Float.Input("s_tmin", default=0.0, min=0.0, max=1000.0, step=0.01,
                                   tooltip="Churn only below this sigma... from"),
                    io.Float.Input("s_tmax", default=1000.0, min=0.0, max=1000.0, step=0.01,
                                   tooltip="...up to this sigma."),
                    io.Float.Input("s_noise", default=1.0, min=0.0, max=2.0, step=0.001,
                                   tooltip="Scale of the churn noise.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, s_churn, s_tmin, s_tmax, s_noise):
        label = "Heun (EDM)"
        for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
            require_finite(label, name, value)
        return io.NodeOutput(sampler_object(label, qs.SAMPLERS["heun"], s_churn=s_churn, s_tmin=s_tmin,
                                            s_tmax=s_tmax, s_noise=s_noise))


FEW_STEP_BASES = ("dpmpp_2m_unic", "dpmpp_2m", "dpmpp_3m_unic", "unipc_bh2", "unipc_bh1", "ipndm_v", "deis")


class QuickstepFewStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepFewStep", display_name="Few-Step Sampler", category=SAMPLER_CATEGORY,
            description="A multistep sampler that can spend fewer model calls than schedule steps: the analytic "
                        "first step (AFS, corrected by the next model output) skips the call at flow sigma 1 ('auto' "
                        "does it exactly there), and the extrapolated final step skips the call at a small last "
                        "sigma (won on the exact oracle, not on the trained digit model: try it on yours). Give the "
                        "scheduler one more step per skipped call.",
            inputs=[io.Combo.Input("base", options=list(FEW_STEP_BASES), default="dpmpp_2m_unic",
                                   tooltip="The multistep solver."),
                    io.Combo.Input("first_step", options=list(qs.FIRST_STEPS), default="auto",
                                   tooltip="model: call the model at the first sigma; analytic: skip that call "
                                           "(sound from flow sigma 1); auto: analytic exactly there."),
                    io.Combo.Input("final_step", options=list(qs.FINAL_STEPS), default="ab2",
                                   tooltip="ab2: second-order jump to 0 (helps few-step flow); denoised: x = D; "
                                           "extrapolate: no call at the last nonzero sigma (only when it is small, "
                                           "as on EPS/V schedules ending at 0.03).")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, base, first_step, final_step):
        label = "Few-Step Sampler"
        require_choice(label, "base", base, FEW_STEP_BASES)
        require_choice(label, "first_step", first_step, qs.FIRST_STEPS)
        require_choice(label, "final_step", final_step, qs.FINAL_STEPS)
        return io.NodeOutput(sampler_object(label, qs.SAMPLERS[base], first_step=first_step, final_step=final_step))


def _quickstep_function(label, sampler, needs, description):
    """The Quickstep sampler function inside a SAMPLER input, or a clear error if it has none with `needs`."""
    fn = getattr(getattr(sampler, "sampler_function", None), "__wrapped__", None)
    if fn is None or not getattr(fn, needs, False):
        name = getattr(getattr(sampler, "sampler_function", None), "__name__", type(sampler).__name__)
        raise QuickstepInputError(label, f"sampler {name!r} cannot be wrapped: it needs {description}")
    return fn, dict(getattr(sampler, "extra_options", {}))


class QuickstepUniCCorrector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepUniCCorrector", display_name="UniC Corrector", category=SAMPLER_CATEGORY,
            description="Upgrades a Quickstep multistep sampler (DPM-Solver++ 2M/3M, DEIS, iPNDM) with the UniC "
                        "corrector at no extra model call.",
            inputs=[io.Sampler.Input("sampler", tooltip="A Quickstep multistep SAMPLER (e.g. from the DPM-Solver++ "
                                     "node, or KSamplerSelect with a qs_ multistep name)."),
                    io.Int.Input("order", default=3, min=1, max=3, tooltip="Corrector order."),
                    io.Combo.Input("variant", options=["bh1", "bh2"], default="bh2", tooltip="B(h) variant.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, sampler, order, variant):
        label = "UniC Corrector"
        require_choice(label, "variant", variant, ("bh1", "bh2"))
        fn, options = _quickstep_function(label, sampler, "supports_corrector",
                                          "a Quickstep multistep sampler (DPM-Solver++ 2M/3M, DEIS, iPNDM)")
        if "corrector" in options or hasattr(fn, "unic_base"):
            raise QuickstepInputError(label, "the sampler already has a corrector")
        return io.NodeOutput(sampler_object(label, qs.with_unic(fn, order, variant), **options))


class QuickstepPFDiff(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepPFDiff", display_name="PFDiff Timestep Skipping", category=SAMPLER_CATEGORY,
            description="PFDiff (arXiv 2408.08822): reuses past slopes to jump to a springboard and future slopes to "
                        "cover k+1 schedule intervals per model evaluation. Use 'PFDiff Steps For Budget' to size "
                        "the schedule for an NFE budget.",
            inputs=[io.Combo.Input("base", options=["euler", "heun"], default="euler",
                                   tooltip="Slope solver: euler (1 call per evaluation) or heun (2)."),
                    io.Int.Input("k", default=2, min=1, max=3, tooltip="Intervals skipped per evaluation."),
                    io.Int.Input("h", default=1, min=1, max=3, tooltip="Springboard offset (1 <= h <= k).")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, base, k, h):
        label = "PFDiff Timestep Skipping"
        require_choice(label, "base", base, ("euler", "heun"))
        try:
            fn = qs.with_pfdiff(qs.SAMPLERS[base], k=k, h=h)
        except ValueError as error:
            raise QuickstepInputError(label, str(error)) from None
        return io.NodeOutput(sampler_object(label, fn))


class QuickstepPFDiffSteps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepPFDiffSteps", display_name="PFDiff Steps For Budget", category=SAMPLER_CATEGORY,
            description="How many schedule steps PFDiff needs to spend a given number of model evaluations.",
            inputs=[io.Int.Input("evaluations", default=5, min=1, max=200,
                                 tooltip="Model evaluations to spend (NFE with the euler base)."),
                    io.Int.Input("k", default=2, min=1, max=3, tooltip="The PFDiff node's k.")],
            outputs=[io.Int.Output(display_name="steps")])

    @classmethod
    def execute(cls, evaluations, k):
        return io.NodeOutput(qs.pfdiff_fine_steps(evaluations, k))


class QuickstepRestart(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepRestart", display_name="Restart Sampling", category=SAMPLER_CATEGORY,
            description="Restart sampling (Xu et al. 2023): at t_min, re-noise back to t_max and solve again, "
                        "repeats times; re-noising is marginal-preserving for flow models.",
            inputs=[io.Combo.Input("base", options=["heun", "euler", "dpmpp_2m"], default="heun",
                                   tooltip="Solver for the main schedule and the restarts."),
                    io.Float.Input("t_min", default=0.1, min=0.001, max=100.0, step=0.001,
                                   tooltip="Noise level (VE units) where restarts begin."),
                    io.Float.Input("t_max", default=2.0, min=0.002, max=100.0, step=0.001,
                                   tooltip="Noise level (VE units) restarts go back up to."),
                    io.Int.Input("restart_steps", default=10, min=1, max=100, tooltip="Steps of each restart."),
                    io.Int.Input("repeats", default=2, min=1, max=20, tooltip="How many restarts."),
                    io.Float.Input("s_noise", default=1.0, min=0.0, max=2.0, step=0.001,
                                   tooltip="Scale of the restart noise.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, base, t_min, t_max, restart_steps, repeats, s_noise):
        label = "Restart Sampling"
        require_choice(label, "base", base, ("heun", "euler", "dpmpp_2m"))
        for name, value in (("t_min", t_min), ("t_max", t_max), ("s_noise", s_noise)):
            require_finite(label, name, value)
        if not t_min < t_max:
            raise QuickstepInputError(label, f"t_min = {t_min} must be below t_max = {t_max}")
        fn = qs.with_restart(qs.SAMPLERS[base], restart={t_min: (restart_steps, repeats, t_max)}, s_noise=s_noise)
        return io.NodeOutput(sampler_object(label, fn))


class QuickstepParallelSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepParallelSampling", display_name="Parallel-in-Time Sampling", category=SAMPLER_CATEGORY,
            description="ParaDiGMS: Picard iterations over a sliding window of steps, the window evaluated in one "
                        "batched model call: the same result as sequential Euler within the tolerance, in fewer "
                        "sequential rounds (a wall-time gain on a GPU with spare batch capacity).",
            inputs=[io.Int.Input("window", default=8, min=1, max=64, tooltip="Steps evaluated together per round."),
                    io.Float.Input("tolerance", default=0.1, min=1e-6, max=10.0, step=0.001,
                                   tooltip="Convergence tolerance relative to the step noise; smaller = closer "
                                   "to sequential, more rounds.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, window, tolerance):
        require_finite("Parallel-in-Time Sampling", "tolerance", tolerance, 1e-6, 10.0)
        return io.NodeOutput(sampler_object("Parallel-in-Time Sampling", qs.SAMPLERS["paradigms"], window=window,
                                            tolerance=tolerance))


NODES = [QuickstepDPMSolverPP, QuickstepUniPC, QuickstepDEIS, QuickstepIPNDM, QuickstepHeunEDM, QuickstepFewStep,
         QuickstepUniCCorrector, QuickstepPFDiff, QuickstepPFDiffSteps, QuickstepRestart, QuickstepParallelSampling]
