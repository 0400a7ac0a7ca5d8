"""A solver learned for the user's model (samplers/learned_solver.py) as SAMPLER + SIGMAS nodes: optimized once
(cached on disk), saved and loaded with the model's fingerprint, or carried inside the workflow as text.

A solver file is a schedule file (nodes/schedules.py: same folder, format, fingerprint and checks) whose record also
holds the solver's coefficients, so everything about saving schedules applies to it unchanged.
"""
import hashlib
import json
import logging
import os

import torch

from comfy_api.latest import io

from .common import CATEGORY, QuickstepInputError, require_finite
from .samplers import sampler_object
from .schedules import (_conditioning_digest, _teacher_grid, host_progress, model_fingerprint, optimize_in_host,
                        read_schedule_file, refuse_other_model, schedule_dir, schedule_path, stock_schedules,
                        write_json_atomically, SCHEDULE_FORMAT)
from ..samplers.frame import is_flow
from ..samplers.learned_solver import LearnedSolver, check_sigmas_match, learn_solver, sample_learned

SOLVER_CATEGORY = f"{CATEGORY}/schedules"
VALIDATION_SHARE = 1 / 3        # of the noises held out for early stopping and for choosing the result


def learned_sampler(node, solver):
    """The SAMPLER of a learned solver; sigmas other than its own are refused naming `node`."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        try:
            check_sigmas_match(sigmas, options["learned_sigmas"])
        except ValueError as error:
            raise QuickstepInputError(node, str(error)) from None
        return sample_learned(model, x, sigmas, extra_args, callback, disable, **options)
    sample.validate = sample_learned.validate
    return sampler_object(node, sample, **solver.options())


def solver_outputs(node, solver):
    """(SAMPLER, SIGMAS, text) of a learned solver."""
    sigmas = torch.tensor(solver.sigmas, dtype=torch.float32)
    return io.NodeOutput(learned_sampler(node, solver), sigmas, solver_text(solver))


def solver_text(solver):
    return json.dumps(solver.to_dict(), separators=(",", ":"))


def parse_solver(node, record):
    try:
        return LearnedSolver.from_dict(record)
    except (KeyError, TypeError, ValueError) as error:
        raise QuickstepInputError(node, f"not a learned solver ({error})") from None


def solver_record(solver, settings, result=None):
    """A schedule record (Load Schedule reads its sigmas) with the solver inside."""
    record = {"format": SCHEDULE_FORMAT, "sigmas": solver.sigmas, "solver": solver.to_dict(), "settings": settings}
    if result is not None:
        record["result"] = result
    return record


def read_solver_file(node, path):
    record, _ = read_schedule_file(node, path)
    if "solver" not in record:
        raise QuickstepInputError(node, f"{os.path.basename(path)} holds a schedule, not a learned solver (use "
                                  "Load Schedule)")
    return record, parse_solver(node, record["solver"])


def learn_for_model(model, positive, negative, cfg, latent, steps, trajectories, teacher_steps, max_fits, seed,
                    progress=None):
    """(LearnedSolver, info) as the Optimize Solver node computes it (bench.learned_solver measures this): the
    model's own trajectories in the host's sampling path, a third of them held out, DPM-Solver++ on the best stock
    schedule as the start, the teacher on the model's default spacing."""
    n_train = trajectories - int(trajectories * VALIDATION_SHARE)
    flow = is_flow(model.get_model_object("model_sampling"))

    def optimize(denoise_fn, x_start, model_sampling):
        return learn_solver(denoise_fn, x_start, n_train, _teacher_grid(model_sampling, teacher_steps, flow), steps,
                            flow=flow, init=stock_schedules(model_sampling, steps), max_fits=max_fits,
                            progress=progress)
    return optimize_in_host(model, positive, negative, cfg, latent, trajectories, seed, optimize)


class QuickstepOptimizeSolver(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepOptimizeSolver",
            display_name="Optimize Solver For My Model",
            category=SOLVER_CATEGORY,
            description="Learns a few-step solver for this model, prompt, CFG and latent size: its time steps and "
                        "the coefficients of each multistep step, fitted to the model's own trajectories (a "
                        "many-step reference) on some noises and chosen on others it never trained on, so it is "
                        "never worse there than DPM-Solver++ on the best stock schedule it starts from. Connect "
                        "both outputs to SamplerCustom. Cached on disk; the text output pasted into 'Solver From "
                        "Text' carries it inside a shared workflow.",
            inputs=[io.Model.Input("model", tooltip="The model to learn the solver for."),
                    io.Conditioning.Input("positive", tooltip="Positive conditioning used while sampling."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning used while sampling."),
                    io.Latent.Input("latent_image", tooltip="A latent of the size you will sample at."),
                    io.Int.Input("steps", default=5, min=2, max=20, tooltip="Model calls (NFE) of the solver."),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1,
                                   tooltip="CFG scale used while sampling."),
                    io.Int.Input("trajectories", default=24, min=3, max=256,
                                 tooltip="Noises to learn from; a third is held out for validation (early "
                                         "stopping and the final choice)."),
                    io.Int.Input("teacher_steps", default=40, min=10, max=1000,
                                 tooltip="Steps of the reference trajectories; the learned time steps are among "
                                         "its steps."),
                    io.Int.Input("max_fits", default=16, min=1, max=500,
                                 tooltip="Search budget: passes over the training noises (each costs 'steps' "
                                         "model calls on two thirds of the trajectories)."),
                    io.Int.Input("training_seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="Seed of the training noises (fixed, so the result can be cached).")],
            outputs=[io.Sampler.Output(display_name="sampler"), io.Sigmas.Output(display_name="sigmas"),
                     io.String.Output(display_name="solver_text")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, steps, cfg, trajectories, teacher_steps, max_fits,
                training_seed):
        node = "Optimize Solver For My Model"
        require_finite(node, "cfg", cfg, 0.0, 100.0)
        n_valid = int(trajectories * VALIDATION_SHARE)
        n_train = trajectories - n_valid
        if n_valid < 1 or n_train < 2:
            raise QuickstepInputError(node, f"trajectories = {trajectories} is too few to split into training "
                                      "(>= 2) and validation (>= 1) noises; use at least 3 (24 recommended)")
        if not 2 <= steps <= teacher_steps - 1:
            raise QuickstepInputError(node, f"steps = {steps} cannot be reached: the learned steps are among the "
                                      f"teacher's {teacher_steps} steps, so steps must be 2 to {teacher_steps - 1}")
        flow = is_flow(model.get_model_object("model_sampling"))
        settings = {"method": "learned-solver", "steps": steps, "cfg": cfg, "trajectories": trajectories,
                    "teacher_steps": teacher_steps, "max_fits": max_fits, "seed": training_seed,
                    "latent_shape": list(latent_image["samples"].shape[1:]),
                    "conditioning": _conditioning_digest(positive, negative), "flow": flow,
                    "model": model_fingerprint(model)}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        cache_path = os.path.join(schedule_dir(), "cache", f"solver-{key}.json")
        if os.path.exists(cache_path):
            logging.info("Quickstep: reusing the solver learned earlier (%s)", cache_path)
            return solver_outputs(node, read_solver_file(node, cache_path)[1])
        try:
            solver, info = learn_for_model(model, positive, negative, cfg, latent_image, steps, trajectories,
                                           teacher_steps, max_fits, training_seed, host_progress(100))
        except ValueError as error:
            raise QuickstepInputError(node, str(error)) from None
        except FloatingPointError as error:
            raise QuickstepInputError(node, f"optimization stopped: {error}; nothing was written (try fewer steps "
                                      "or more teacher steps)") from None
        logging.info("Quickstep %s: validation error %.4g -> %.4g (DPM-Solver++ on %s -> learned), %d passes, "
                     "%.0f s, stopped: %s", node, info["objective_before"], info["objective_after"],
                     info["initial_sigmas"], info["fits"], info["wall_time_s"], info["stopped"])
        summary = {k: info[k] for k in ("objective_before", "objective_after", "mean_before", "mean_after", "fits",
                                        "stopped", "initial_sigmas", "wall_time_s")}
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        write_json_atomically(cache_path, solver_record(solver, settings, summary))
        return solver_outputs(node, solver)


class QuickstepSaveSolver(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepSaveSolver",
            display_name="Save Solver",
            category=SOLVER_CATEGORY,
            description="Saves a learned solver under a name (models/quickstep_schedules/NAME.json) with the "
                        "model's fingerprint and family, so 'Load Solver' can check it belongs to the model.",
            is_output_node=True,
            inputs=[io.String.Input("solver_text", force_input=True,
                                    tooltip="The solver_text output of 'Optimize Solver For My Model'."),
                    io.Model.Input("model", tooltip="The model the solver was learned for."),
                    io.String.Input("name", default="my_solver", tooltip="File name (letters, digits, - and _).")],
            outputs=[io.String.Output(display_name="solver_text")])

    @classmethod
    def execute(cls, solver_text, model, name):
        node = "Save Solver"
        path = schedule_path(node, name)
        solver = parse_solver(node, _json(node, solver_text))
        flow = is_flow(model.get_model_object("model_sampling"))
        if solver.flow != flow:
            raise QuickstepInputError(node, f"the solver was learned for a {'flow' if solver.flow else 'eps/v'} "
                                      "model, not this one")
        write_json_atomically(path, solver_record(solver, {"model": model_fingerprint(model), "flow": flow}))
        return io.NodeOutput(solver_text)


class QuickstepLoadSolver(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepLoadSolver",
            display_name="Load Solver",
            category=SOLVER_CATEGORY,
            description="Loads a solver saved by 'Save Solver' as SAMPLER + SIGMAS. Refuses one saved for another "
                        "model or family unless forced.",
            inputs=[io.Model.Input("model", tooltip="The model the solver will be used with."),
                    io.String.Input("name", default="my_solver", tooltip="Name given when saving."),
                    io.Boolean.Input("force", default=False, tooltip="Use the solver even if it was saved for "
                                     "another model (logged as a warning).")],
            outputs=[io.Sampler.Output(display_name="sampler"), io.Sigmas.Output(display_name="sigmas"),
                     io.String.Output(display_name="solver_text")])

    @classmethod
    def execute(cls, model, name, force):
        node = "Load Solver"
        path = schedule_path(node, name)
        if not os.path.exists(path):
            raise QuickstepInputError(node, f"name = {name!r}: no saved solver of that name in {schedule_dir()}")
        record, solver = read_solver_file(node, path)
        refuse_other_model(node, f"solver {name!r}", record.get("settings", {}), model, force)
        return solver_outputs(node, solver)


class QuickstepSolverFromText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepSolverFromText",
            display_name="Solver From Text",
            category=SOLVER_CATEGORY,
            description="SAMPLER + SIGMAS from a learned solver's text (the solver_text output of 'Optimize Solver "
                        "For My Model' pasted in): it travels inside the workflow JSON, so a shared workflow "
                        "reproduces it exactly without a file.",
            inputs=[io.String.Input("solver_text", multiline=True, default="",
                                    tooltip="The solver as JSON: sigmas, coefficients (per step, newest model "
                                            "output first) and flow.")],
            outputs=[io.Sampler.Output(display_name="sampler"), io.Sigmas.Output(display_name="sigmas")])

    @classmethod
    def execute(cls, solver_text):
        node = "Solver From Text"
        output = solver_outputs(node, parse_solver(node, _json(node, solver_text)))
        return io.NodeOutput(*output.result[:2])


def _json(node, text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise QuickstepInputError(node, f"solver_text {str(text)[:80]!r} is not JSON from Optimize Solver") from None


NODES = [QuickstepOptimizeSolver, QuickstepSaveSolver, QuickstepLoadSolver, QuickstepSolverFromText]
