"""A Tuner's own state for checkpoints and the guard's snapshots: everything but the model's weights and the user's
optimiser (which have their own), and the step checks' counts (the Tuner adds those)."""
import torch

# what a state fitted by difference before December 7 (twenty-eighth session) ran with: pace 0.5 from V ~ N(0, 1/n),
# uncapped ([pace, started near V = 1, path cap], as ``capture`` keeps them)
DIFFERENCE_BEFORE_DECEMBER_7 = (0.5, False, 0.0)


def capture(tuner):
    t = tuner
    return {"u": t.u.detach().clone(), "hscale": t.hscale.detach().clone(), "opt_h": t.opt_h.state_dict(),
            "gen": t.gen.get_state(), "gen_device": t.gen.device.type, "step": t.step, "hstep": t.hstep,
            "anchor": t.anchor.clone(), "sigma_max": t.sigma_max, "hyper_lr_factor": t.hyper_lr_factor,
            "space": t.space.names, "method": t.method, "response_gain_max": t.response_gain_max,
            "response_baseline": t.baseline.state_dict() if t.baseline is not None else None,
            "response_fit": t.response_fit, "difference": [t.difference_pace, t.near_one, t.path_cap]}


def restore(tuner, st, generator=True):
    """Load ``capture``'s dict (or an older one: fields added since take the tuner's own); ``generator=False``
    leaves the random generator alone."""
    t = tuner
    if st["space"] != t.space.names or st["method"] != t.method:
        raise ValueError(f"stn_ext: the state (checkpoint) is of method {st['method']!r} with hyperparameters "
                         f"{st['space']}; this run is {t.method!r} with {t.space.names}")
    # a state from before the fit was recorded: per example, every response was fitted on the gradient then
    fit = st.get("response_fit", "gradient" if t.perturb == "example" else t.response_fit)
    if fit != t.response_fit:
        raise ValueError(f"stn_ext: the state (checkpoint) fitted the response by {fit!r}, this tuner by "
                         f"{t.response_fit!r} (the default 'auto' chooses by difference where it can since December "
                         f"2026); to go on as it ran, pass response_fit={fit!r} (--response-fit {fit})")
    ran = st.get("difference", DIFFERENCE_BEFORE_DECEMBER_7)
    if fit == "difference" and list(ran) != [t.difference_pace, t.near_one, t.path_cap]:
        raise ValueError(f"stn_ext: the state (checkpoint) fitted the response by difference at pace {ran[0]}, "
                         f"started near V = 1: {ran[1]}, its path capped at {ran[2]}; this tuner at {t.difference_pace}, "
                         f"{t.near_one}, {t.path_cap} (Delta-STN's defaults where masks are drawn since December 2026, "
                         "defaults.difference_settings); go on with the version that wrote it, or start the run anew")
    with torch.no_grad():
        t.u.copy_(st["u"])
        t.hscale.copy_(st["hscale"])
        if "anchor" in st:
            t.anchor.copy_(st["anchor"])
    t.opt_h.load_state_dict(st["opt_h"])
    if generator:
        t.gen.set_state(st["gen"])
    t.step, t.hstep = st["step"], st["hstep"]
    t.sigma_max, t.hyper_lr_factor = st.get("sigma_max", t.sigma_max), st.get("hyper_lr_factor", 1.0)
    t.response_gain_max = st.get("response_gain_max", t.response_gain_max)  # 1 once rolled back
    if t.baseline is not None:  # a state from before the baseline, or from the warm-up: it starts afresh
        t.baseline.load_state_dict(st.get("response_baseline"))
