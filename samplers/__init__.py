"""Quickstep samplers: plain torch, importable without ComfyUI (relative imports only).

SAMPLERS maps a name (the node layer adds the "qs_" prefix) to a k-diffusion sampler function
`fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)`; every function has a
`validate(**options)` attribute that raises ValueError naming the bad option.  The wrapper constructors
(with_unic, with_pfdiff, with_restart) build further samplers from a base one.
"""
from .common import validate_sigmas
from .distilled import FAMILIES as DISTILLED_FAMILIES, consistency_sigmas, sample_tcd
from .frame import Frame, frame_of, is_flow, model_sampling_of
from .parallel import sample_paradigms
from .solvers import (FINAL_STEPS, FIRST_STEPS, UniC, resolve_first_step, run_multistep,
                      sample_deis, sample_dpm_solver_2, sample_dpm_solver_3, sample_dpmpp_2m, sample_dpmpp_2s,
                      sample_dpmpp_3m, sample_euler, sample_heun, sample_ipndm, sample_ipndm_v, sample_unipc,
                      sample_unipc_bh1, sample_unipc_bh2, singlestep_nfe)
from .wrappers import (DEFAULT_RESTART, pfdiff_fine_steps, pfdiff_nfe, with_defaults, with_pfdiff, with_restart,
                       with_unic)

SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpm_solver_2": sample_dpm_solver_2,
    "dpm_solver_3": sample_dpm_solver_3,
    "unipc_bh1": sample_unipc_bh1,
    "unipc_bh2": sample_unipc_bh2,
    "deis": sample_deis,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "dpmpp_2m_unic": with_unic(sample_dpmpp_2m),
    "dpmpp_3m_unic": with_unic(sample_dpmpp_3m),
    "ipndm_v_unic": with_unic(sample_ipndm_v),
    "deis_unic": with_unic(sample_deis),
    # few-step preset: no model call at flow sigma = 1 (analytic first step), second-order final step (solvers.py)
    "dpmpp_2m_unic_fewstep": with_defaults(with_unic(sample_dpmpp_2m), "dpmpp_2m_unic_fewstep", first_step="auto",
                                           final_step="ab2"),
    "pfdiff": with_pfdiff(sample_euler, k=2, h=1),
    "pfdiff_heun": with_pfdiff(sample_heun, k=1, h=1),
    "restart": with_restart(sample_heun),
    "paradigms": sample_paradigms,
    "tcd": sample_tcd,
}


def validate_options(name, **options):
    """Raise ValueError for an unknown sampler name or a bad option value of that sampler."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    SAMPLERS[name].validate(**options)


__all__ = ["SAMPLERS", "validate_options", "validate_sigmas", "Frame", "frame_of", "is_flow", "model_sampling_of",
           "FIRST_STEPS", "FINAL_STEPS", "UniC", "resolve_first_step", "run_multistep",
           "with_unic", "with_defaults", "with_pfdiff", "with_restart", "pfdiff_fine_steps", "pfdiff_nfe",
           "singlestep_nfe", "DEFAULT_RESTART", "DISTILLED_FAMILIES", "consistency_sigmas"] + [
               f.__name__ for f in SAMPLERS.values()]
