"""The distilled students of the embedded digit model (consistency and DSNO-style), through the same nodes as their
teacher in the real host: one call lands near the teacher's 20-step sample from the same noise, far nearer than the
teacher's own single step, and asking for a student of the eps variant is refused."""
import torch

from graphs import sink
from modelzoo.students import TEACHER_CFG

DIGITS = "0123456789"
DSNO_BOUND = 0.6


def _graph(distilled, sampler_node, steps, cfg, prediction="flow"):
    return {
        "model": {"class_type": "QuickstepDigitModel", "inputs": {"prediction": prediction, "distilled": distilled}},
        "positive": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": DIGITS}},
        "negative": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": ""}},
        "latent": {"class_type": "QuickstepEmptyDigitLatent", "inputs": {"batch_size": len(DIGITS)}},
        "sampler": sampler_node,
        "sigmas": {"class_type": "BasicScheduler",
                   "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": steps, "denoise": 1.0}},
        "out": {"class_type": "SamplerCustom",
                "inputs": {"model": ["model", 0], "add_noise": True, "noise_seed": 123, "cfg": cfg,
                           "positive": ["positive", 0], "negative": ["negative", 0], "sampler": ["sampler", 0],
                           "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "keep": sink("out"),
    }


def _digits(inproc, graph):
    return inproc.output(inproc.run(graph), "out")["samples"].clamp(-1, 1)


def _rms(a, b):
    return (a - b).pow(2).flatten(1).mean(1).sqrt().mean().item()


def test_one_step_student_lands_near_the_teachers_20_step_sample(inproc):
    tcd_gamma_1 = {"class_type": "QuickstepTCDSampler", "inputs": {"gamma": 1.0, "pure_noise_start": False}}
    dpm = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "qs_dpmpp_2m"}}
    euler = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    teacher_20 = _digits(inproc, _graph("none", dpm, 20, TEACHER_CFG))
    teacher_1 = _digits(inproc, _graph("none", euler, 1, TEACHER_CFG))
    student_1 = _digits(inproc, _graph("consistency", tcd_gamma_1, 1, 1.0))
    student_2 = _digits(inproc, _graph("consistency", tcd_gamma_1, 2, 1.0))
    dsno = _digits(inproc, _graph("dsno", euler, 1, 1.0))
    near, far = _rms(student_1, teacher_20), _rms(teacher_1, teacher_20)
    print(f"RMS to the teacher's 20-step samples: student 1 step {near:.3f}, 2 steps {_rms(student_2, teacher_20):.3f}"
          f", DSNO-style 1 call {_rms(dsno, teacher_20):.3f}, teacher 1 step {far:.3f}")
    assert near < 0.6 * far          # measured 0.51x (0.155 vs 0.305)
    assert torch.isfinite(student_2).all() and _rms(student_2, teacher_20) < far
    assert torch.isfinite(dsno).all() and _rms(dsno, teacher_20) < DSNO_BOUND * far


def test_a_student_of_the_eps_variant_is_refused(inproc):
    euler = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    result = inproc.run(_graph("consistency", euler, 1, 1.0, prediction="eps"), check=False)
    assert result.status == "error"
    message = result.error()["exception_message"]
    assert "Digit Model" in message and "prediction = 'eps'" in message
