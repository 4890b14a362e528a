"""The paper's claims 1-5 checked against runs, over seeds, read the way the paper reads its
figures.

Runs that differ only by seed (`seed_everything`, `data.seed`) form one *arm*; arms that differ
only by norm form a *context* (model, lr, optimizer, ...). A claim is a list of *parts*; each part
is checked in every seed (two arms are compared seed by seed, paired by seed: with the same seed
the BN and the standard network start from the same conv weights and see the same batches), and
a part holds only if it holds in every seed. The verdicts:

  shown                    every part with runs holds in every seed
  not shown                a part fails in some seed (the note names the part and in how many seeds)
  baseline did not train   the claim compares with the standard network, and that network does
                           not train at the reference lr (VGG: lr 0.1 ends at chance; DLN: lr 1e-6
                           does not halve its loss) in some seed: a comparison with a dead
                           baseline proves nothing, whatever it gives
  no runs                  the claim's core comparison has no runs

Numbers are means over seeds with their standard deviation and n. Each claim's `rule` states its
thresholds (module constants) and `reason` why the rule reads the evidence that way. `as_json`
gives the table for scripts (report writes it as claims.json).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from bnstudy.analysis.runs import Run

CHANCE_ACC_MAX = 0.2      # 10 classes: chance is 0.1; a final test accuracy at most this is chance
TRAIN_LEVEL = 0.9         # "trains": smoothed training accuracy reaches this (steps to it = speed)
SMOOTH = 3                # training accuracy is the running mean of the last SMOOTH logged values
REFERENCE_LR = {"vgg": 0.1, "dln": 1e-6}  # the paper's lr: where the baseline gate looks
DLN_TRAINED = 0.5         # the DLN trains if its final train loss is below this x its first
HIGH_LR = 0.5             # claim 1: the lr at which the paper's standard VGG stays at chance
NOISY_GAP_MAX = 0.05      # claim 2: noisy BN's final train accuracy within this of BN's
ICS_REL_RATIO = 0.5       # claim 3: BN's ||G - G'|| / ||G|| below this x standard's is a reduction
ICS_COS_MARGIN = 0.05     # claim 3: BN's cos(G, G') above standard's by more than this is one too
EARLY_FRACTION = 0.25     # claim 4: the early window is the first quarter of the run
MATCH_START = 0.9         # claim 4: matched losses start below this x the first loss (training)
LANDSCAPE_RATIO_MAX = 1.0  # claim 4: BN / standard of each smoothness measure below this
LP_ACC_TOL = 0.05         # claim 5 (VGG): lp's final train accuracy within this of BN's
LP_LOSS_RATIO_MAX = 2.0   # claim 5 (DLN): lp's final train loss below this x BN's

SHOWN, NOT_SHOWN, NO_RUNS = "shown", "not shown", "no runs"
BASELINE = "baseline did not train"
VERDICTS = (SHOWN, NOT_SHOWN, BASELINE, NO_RUNS)
CONTEXT_KEYS = ("model", "lr", "optimizer", "momentum", "weight_decay", "init", "init_scale",
                "depth", "width", "data", "data.image_size", "data.num_samples", "data.dim",
                "reduction")
LP_NORMS = ("l1", "l2", "linf")
READINGS = ("matched", "early", "whole run")  # claim 4: where the landscape is compared


@dataclass
class Claim:
    number: int
    statement: str
    rule: str
    reason: str = ""
    numbers: list[str] = field(default_factory=list)
    verdict: str = NO_RUNS
    note: str = ""
    parts: list[dict] = field(default_factory=list)  # {part, seeds, holding, holds}


def as_json(claims: list[Claim]) -> list[dict]:
    """The claims table as plain data (claims.json)."""
    return [asdict(c) for c in claims]


# ---- one run, one seed ----------------------------------------------------------------------------

def seed_of(run: Run) -> tuple:
    return (run.get("seed_everything"), run.get("data.seed"))


def final_test_acc(run: Run) -> float | None:
    """Last test accuracy; a diverged run counts as chance (0.1)."""
    return 0.1 if run.diverged else run.last("val/acc")


def train_acc_curve(run: Run, smooth: int = SMOOTH) -> list[tuple[int, float]]:
    """Training accuracy, the running mean of the last `smooth` logged values (one batch each)."""
    pts = run.finite("train/acc")
    return [(s, statistics.fmean(v for _, v in pts[max(0, i - smooth + 1):i + 1]))
            for i, (s, _) in enumerate(pts)]


def final_train_acc(run: Run) -> float | None:
    if run.diverged:
        return 0.1
    curve = train_acc_curve(run)
    return curve[-1][1] if curve else None


def steps_to(run: Run, level: float = TRAIN_LEVEL, smooth: int = SMOOTH) -> float:
    """First step at which the smoothed training accuracy reaches `level`; inf if never."""
    return next((float(s) for s, v in train_acc_curve(run, smooth) if v >= level), math.inf)


def first_loss(run: Run) -> float | None:
    pts = run.finite("train/loss")
    return pts[0][1] if pts else None


def final_loss(run: Run) -> float | None:
    return math.inf if run.diverged else run.last("train/loss")


def trains(run: Run) -> bool:
    """VGG: the smoothed training accuracy reaches TRAIN_LEVEL; DLN: the final train loss is
    below DLN_TRAINED x its first."""
    if run.diverged:
        return False
    if run.model == "dln":
        first, last = first_loss(run), final_loss(run)
        return first is not None and last is not None and last < DLN_TRAINED * first
    return steps_to(run) < math.inf


def at_chance(run: Run) -> bool:
    acc = final_test_acc(run)
    return run.diverged or (acc is not None and acc <= CHANCE_ACC_MAX)


def left_chance(run: Run) -> bool:
    """The baseline gate's test: VGG ends above chance, the DLN trains."""
    if run.model == "dln":
        return trains(run)
    acc = final_test_acc(run)
    return not run.diverged and acc is not None and acc > CHANCE_ACC_MAX


def moment_drift(run: Run) -> tuple[float | None, float | None]:
    """(dmean, dvar): the medians of the step-to-step change of the units' mean and variance over
    every instrumented layer and measurement (claims 2 and 5)."""
    return median_of(run, "act/", "/dmean"), median_of(run, "act/", "/dvar")


def median_of(run: Run, prefix: str, suffix: str = "", steps: set[int] | None = None
              ) -> float | None:
    """Median of the finite values of the metrics `prefix*suffix` (all their layers), at `steps`
    (all if None)."""
    values = [v for k in run.keys(prefix) if k.endswith(suffix) for s, v in run.finite(k)
              if steps is None or s in steps]
    return statistics.median(values) if values else None


def loss_at(run: Run) -> dict[int, float]:
    """The training loss at each probe step: landscape/loss_w (the loss at W_t on the step's
    batch, logged by Landscape) where logged, else the nearest logged train/loss."""
    exact = dict(run.finite("landscape/loss_w"))
    train = run.finite("train/loss")
    out = {}
    for s, _ in run.finite("landscape/beta_eff"):
        if s in exact:
            out[s] = exact[s]
        elif train:
            out[s] = min(train, key=lambda p: abs(p[0] - s))[1]
    return out


def loss_band(run: Run, steps: set[int] | None) -> float | None:
    """Median over `steps` of the loss band's width relative to the loss at W:
    (max - min of L(W - eta g) over eta) / L(W)."""
    lo, hi = dict(run.finite("landscape/loss_min")), dict(run.finite("landscape/loss_max"))
    level = loss_at(run)
    widths = [(hi[s] - lo[s]) / level[s] for s in lo
              if s in hi and level.get(s) and (steps is None or s in steps)]
    return statistics.median(widths) if widths else None


def early_steps(run: Run) -> set[int]:
    """Probe steps in the first EARLY_FRACTION of the run (step 0 left out: the landscape at the
    initialization is the same network's whatever happens later)."""
    end = EARLY_FRACTION * max(run.steps, 1)
    return {s for s, _ in run.finite("landscape/beta_eff") if 0 < s <= end}


def matched_steps(a: Run, b: Run) -> tuple[set[int], set[int], tuple[float, float] | None]:
    """The probe steps of `a` and of `b` at matched training loss: the losses both runs pass
    through while training, from MATCH_START x the higher first loss down to the higher of their
    lowest losses. Empty (and no range) when a run never gets below MATCH_START x its start."""
    la, lb = loss_at(a), loss_at(b)
    fa, fb = first_loss(a), first_loss(b)
    if not la or not lb or fa is None or fb is None:
        return set(), set(), None
    top = MATCH_START * min(fa, fb)
    bottom = max(min(la.values()), min(lb.values()))
    if bottom >= top:
        return set(), set(), None
    pick = lambda level: {s for s, v in level.items() if bottom <= v <= top and s > 0}  # noqa
    return pick(la), pick(lb), (bottom, top)


# ---- seeds -------------------------------------------------------------------------------------

def paired(a: list[Run], b: list[Run]) -> list[tuple[Run, Run]]:
    """Runs of two arms paired by seed; if no seed is shared, in the order given."""
    by_seed = {seed_of(r): r for r in b}
    pairs = [(r, by_seed[seed_of(r)]) for r in a if seed_of(r) in by_seed]
    return pairs or list(zip(a, b))


def stat(values: Sequence[float | None], fmt: str = ".3g") -> str:
    """'mean +- sd (n)' over seeds; infinities (never reached) counted apart."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    finite = [v for v in vals if math.isfinite(v)]
    never = len(vals) - len(finite)
    if not finite:
        return f"never (n={len(vals)})"
    text = f"{statistics.fmean(finite):{fmt}}"
    if len(finite) > 1:
        text += f" +- {statistics.stdev(finite):{fmt}}"
    text += f" (n={len(vals)}" + (f", {never} never" if never else "") + ")"
    return text


@dataclass
class _Parts:
    """The parts of one claim: each checked per seed, holding only in every seed."""
    rows: list[dict] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)  # whose standard network it compares

    def check(self, what: str, results: Sequence[bool]) -> None:
        results = list(results)
        if not results:
            self.untested.append(what)
            return
        holding = sum(map(bool, results))
        self.rows.append({"part": what, "seeds": len(results), "holding": holding,
                          "holds": holding == len(results)})

    def verdict(self, claim: Claim, core: bool, runs: list[Run]) -> Claim:
        gate = baseline_gate(runs, sorted(self.models))
        claim.parts = self.rows
        failed = [r for r in self.rows if not r["holds"]]
        notes = []
        if gate:
            notes.append("the standard network does not train: " + "; ".join(gate))
        if failed:
            notes.append("fails: " + "; ".join(f"{r['part']} (holds in {r['holding']} of "
                                               f"{r['seeds']} seeds)" for r in failed))
        if self.untested:
            notes.append("not tested (no runs or not logged): " + "; ".join(self.untested))
        claim.note = ". ".join(notes)
        if not core:
            claim.verdict = NO_RUNS
        elif gate:
            claim.verdict = BASELINE
        else:
            claim.verdict = NOT_SHOWN if failed else SHOWN
        return claim


# ---- contexts ------------------------------------------------------------------------------------

def contexts(runs: list[Run], norms: tuple[str, ...]) -> list[tuple[str, dict[str, list[Run]]]]:
    """[(label, {norm: runs of that arm})] for runs whose norm is in `norms`, grouped by
    everything but norm and seed; the label names model and lr plus any other context key that
    varies between the contexts of one model."""
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for r in runs:
        if r.norm in norms:
            key = tuple(repr(r.get(k)) for k in CONTEXT_KEYS)
            groups.setdefault(key, {}).setdefault(r.norm, []).append(r)
    out = []
    for key, by_norm in groups.items():
        first = next(iter(by_norm.values()))[0]
        same_model = [k for k in groups if k[0] == key[0]]
        label = f"{first.model} lr {first.lr:g}" + "".join(
            f", {name}={first.get(name)}" for i, name in enumerate(CONTEXT_KEYS)
            if name not in ("model", "lr") and len({k[i] for k in same_model}) > 1)
        for arm in by_norm.values():
            arm.sort(key=lambda r: repr(seed_of(r)))
        out.append((label, by_norm))
    return sorted(out, key=lambda item: item[0])


def paper_recipe(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.paper_optimizer]


def baseline_gate(runs: list[Run], models: Sequence[str]) -> list[str]:
    """Why the standard network does not train, per model (empty: it trains, or there is no run
    of it to tell). Looks at the standard network (norm none, the paper's recipe) at the
    reference lr of each of `models` (vgg, dln)."""
    out = []
    for model in (m for m in models if m in REFERENCE_LR):
        base = [r for r in paper_recipe(runs) if r.model == model and r.norm == "none"
                and r.lr_is(REFERENCE_LR[model])]
        dead = [r for r in base if not left_chance(r)]
        if dead:
            what = ("ends at chance or diverged" if model == "vgg"
                    else f"does not reach {DLN_TRAINED} x its first loss")
            out.append(f"{model} at lr {REFERENCE_LR[model]:g} {what} in {len(dead)} of "
                       f"{len(base)} seeds")
    return out


# ---- the claims -----------------------------------------------------------------------------------

def claim1(runs: list[Run]) -> Claim:
    c = Claim(
        1, "BN trains faster and tolerates larger learning rates (VGG)",
        f"Per seed, paired: at every lr with both, BN reaches {TRAIN_LEVEL:g} training accuracy "
        f"(running mean of {SMOOTH} logged batches) in fewer steps than the standard network "
        f"(never reaching counts as slowest); at lr {REFERENCE_LR['vgg']:g} both reach it; at "
        f"lr >= {HIGH_LR:g} the standard network ends at test accuracy <= {CHANCE_ACC_MAX:g} or "
        f"diverges while BN reaches it. Every part in every seed.",
        "The paper's figure 1 plots training accuracy over steps: BN gets there faster at every "
        "lr, the standard network trains at lr 0.1 (more slowly) and stays at chance at 0.5.")
    parts, core = _Parts(), False
    for label, by in contexts(paper_recipe([r for r in runs if r.model == "vgg"]),
                              ("none", "batch")):
        if not ("none" in by and "batch" in by):
            continue
        core = True
        parts.models.add("vgg")
        pairs = paired(by["batch"], by["none"])
        lr = by["batch"][0].lr
        c.numbers.append(
            f"{label}: steps to {TRAIN_LEVEL:g} train acc BN {stat([steps_to(b) for b, _ in pairs])}"
            f" | none {stat([steps_to(n) for _, n in pairs])}; final test acc BN "
            f"{stat([final_test_acc(b) for b, _ in pairs])} | none "
            f"{stat([final_test_acc(n) for _, n in pairs])}"
            + (f" ({sum(n.diverged for _, n in pairs)} diverged)"
               if any(n.diverged for _, n in pairs) else ""))
        if not any(r.has("train/acc") for r in by["batch"] + by["none"]):
            parts.untested.append(f"{label}: training accuracy not logged")
            continue
        parts.check(f"{label}: BN reaches {TRAIN_LEVEL:g} train accuracy first",
                    [steps_to(b) < steps_to(n) for b, n in pairs])
        if math.isclose(lr, REFERENCE_LR["vgg"], rel_tol=1e-6):
            parts.check(f"{label}: both train", [trains(b) and trains(n) for b, n in pairs])
        if lr >= HIGH_LR:
            parts.check(f"{label}: the standard network at chance or diverged",
                        [at_chance(n) for n in by["none"]])
            parts.check(f"{label}: BN trains", [trains(b) for b in by["batch"]])
    if core and not any(p["part"].endswith("at chance or diverged") for p in parts.rows):
        parts.untested.append(f"runs with and without BN at lr >= {HIGH_LR:g}")
    return parts.verdict(c, core, runs)


def claim2(runs: list[Run]) -> Claim:
    c = Claim(
        2, "Distributional stability is not why BN helps: noisy BN trains about as well as BN; "
           "the same noise without BN stops training (VGG)",
        f"Per seed: noisy BN reaches {TRAIN_LEVEL:g} training accuracy, its final training "
        f"accuracy is within {NOISY_GAP_MAX:g} of BN's, and it reaches {TRAIN_LEVEL:g} before the "
        f"standard network; its activation moments drift more from step to step than BN's and "
        f"than the standard network's (median |change| of the units' mean and variance between "
        f"consecutive steps, all instrumented layers); where the standard network trains at that "
        f"lr, the noise without BN (norm=noise) ends at test accuracy <= {CHANCE_ACC_MAX:g} or "
        f"diverges. Test accuracy is reported with the noise off in evaluation (val/acc) and on "
        f"(val/acc_noise) but not graded: the paper does not say which it used.",
        "The paper's figure 2 compares training accuracy; its point is that noisy BN trains "
        "although its activations are less stable than even the standard network's. The "
        "noise-alone control only says something where the standard network trains.")
    parts, core, control = _Parts(), False, False
    for label, by in contexts(paper_recipe([r for r in runs if r.model == "vgg"]),
                              ("batch", "noisy_batch", "noise", "none")):
        if "none" in by or "noise" in by:
            parts.models.add("vgg")
        if "batch" in by and "noisy_batch" in by:
            core = True
            pairs = paired(by["noisy_batch"], by["batch"])
            text = (f"{label}: final train acc noisy BN "
                    f"{stat([final_train_acc(z) for z, _ in pairs])} | BN "
                    f"{stat([final_train_acc(b) for _, b in pairs])}; steps to {TRAIN_LEVEL:g} "
                    f"noisy BN {stat([steps_to(z) for z, _ in pairs])}; final test acc noisy BN "
                    f"{stat([final_test_acc(z) for z, _ in pairs])} (noise off), "
                    f"{stat([z.last('val/acc_noise') for z, _ in pairs])} (noise on) | BN "
                    f"{stat([final_test_acc(b) for _, b in pairs])}")
            drift = {n: [moment_drift(r)
                         for r in rs] for n, rs in by.items()}
            text += "; moment drift (dmean, dvar) " + ", ".join(
                f"{n} {stat([d[0] for d in ds])}, {stat([d[1] for d in ds])}"
                for n, ds in drift.items() if n != "noise")
            c.numbers.append(text)
            parts.check(f"{label}: noisy BN trains within {NOISY_GAP_MAX:g} of BN",
                        [trains(z) and final_train_acc(z) is not None
                         and final_train_acc(b) is not None
                         and final_train_acc(z) >= final_train_acc(b) - NOISY_GAP_MAX
                         for z, b in pairs])
            if "none" in by:
                parts.check(f"{label}: noisy BN reaches {TRAIN_LEVEL:g} before the standard "
                            f"network", [steps_to(z) < steps_to(n)
                                         for z, n in paired(by["noisy_batch"], by["none"])])
            for other in ("batch", "none"):
                if other not in by:
                    continue
                name = "BN's" if other == "batch" else "the standard network's"
                results = []
                for z, o in paired(by["noisy_batch"], by[other]):
                    dz = moment_drift(z)
                    do = moment_drift(o)
                    if None not in dz + do:
                        results.append(dz[0] > do[0] and dz[1] > do[1])
                parts.check(f"{label}: noisy BN's moments drift more than {name}", results)
        if "noise" in by:
            control = True
            fin = stat([final_test_acc(r) for r in by["noise"]])
            base = by.get("none", [])
            if base and all(left_chance(r) for r in base):
                c.numbers.append(f"{label}: noise without BN final test acc {fin}")
                parts.check(f"{label}: the noise without BN stops training",
                            [at_chance(r) for r in by["noise"]])
            else:
                c.numbers.append(f"{label}: noise without BN final test acc {fin} (not graded: "
                                 f"the standard network does not train here)")
                parts.untested.append(f"{label}: the noise control (the standard network does "
                                      f"not train at this lr)")
    if not control:
        parts.untested.append("the noise-without-BN control (norm=noise)")
    return parts.verdict(c, core, runs)


def _ics_layers(run: Run) -> list[str]:
    return sorted(k.rsplit("/", 1)[1] for k in run.keys("ics/cos/"))


def claim3(runs: list[Run]) -> Claim:
    c = Claim(
        3, "BN does not reduce internal covariate shift (gradient sense); it often increases it",
        f"Per seed, paired, and per instrumented layer (medians over the run's measurements): BN "
        f"does not reduce ICS on either measure: its relative difference ||G - G'|| / ||G|| is "
        f"not below {ICS_REL_RATIO:g} x the standard network's, and its cos(G, G') is not above "
        f"the standard network's by more than {ICS_COS_MARGIN:g}.",
        "The paper's figure 3 shows BN's G and G' less aligned and further apart than the "
        "standard network's. The difference is taken relative to ||G||: BN's gradients can be "
        "orders of magnitude larger, and an absolute ||G - G'|| would grade that, not the "
        "shift. A reduction on either measure fails the claim.")
    parts, core = _Parts(), False
    for label, by in contexts(runs, ("none", "batch")):
        if not ("none" in by and "batch" in by):
            continue
        pairs = paired(by["batch"], by["none"])
        layers = [la for la in _ics_layers(by["batch"][0]) if la in _ics_layers(by["none"][0])]
        if not layers:
            continue
        core = True
        parts.models.add(by["batch"][0].model)
        rel = by["batch"][0].has("ics/rel/") and by["none"][0].has("ics/rel/")
        for layer in layers:
            key = f"ics/rel/{layer}" if rel else f"ics/l2/{layer}"
            rb = [median_of(b, key) for b, _ in pairs]
            rn = [median_of(n, key) for _, n in pairs]
            cb = [median_of(b, f"ics/cos/{layer}") for b, _ in pairs]
            cn = [median_of(n, f"ics/cos/{layer}") for _, n in pairs]
            name = "||G - G'|| / ||G||" if rel else "||G - G'|| (||G|| not logged)"
            c.numbers.append(f"{label} {layer}: {name} BN {stat(rb)} | none {stat(rn)}; cos BN "
                             f"{stat(cb)} | none {stat(cn)}")
            ok = [not (b < ICS_REL_RATIO * n or cos_b > cos_n + ICS_COS_MARGIN)
                  for b, n, cos_b, cos_n in zip(rb, rn, cb, cn) if None not in (b, n, cos_b, cos_n)]
            parts.check(f"{label} {layer}: BN does not reduce ICS", ok)
    return parts.verdict(c, core, runs)


MEASURES: tuple[tuple[str, Callable[[Run, set[int] | None], float | None]], ...] = (
    ("loss band / loss", loss_band),
    ("grad diff", lambda r, s: median_of(r, "landscape/grad_diff_max", steps=s)),
    ("beta_eff", lambda r, s: median_of(r, "landscape/beta_eff", steps=s)),
)


def landscape_readings(a: Run, b: Run) -> dict[str, tuple[set[int] | None, set[int] | None]]:
    """The probe steps each reading compares, for run a and run b (None: all of them)."""
    ma, mb, _ = matched_steps(a, b)
    return {"matched": (ma, mb), "early": (early_steps(a), early_steps(b)),
            "whole run": (None, None)}


def compare_landscape(a: Run, b: Run, measures=MEASURES) -> dict[str, dict[str, tuple]]:
    """{reading: {measure: (a's median, b's median)}}; readings without steps left out."""
    out = {}
    for reading, (sa, sb) in landscape_readings(a, b).items():
        if sa is not None and (not sa or not sb):
            continue
        out[reading] = {m: (fn(a, sa), fn(b, sb)) for m, fn in measures}
    return out


def claim4(runs: list[Run]) -> Claim:
    c = Claim(
        4, "BN makes the loss landscape smoother: loss, gradient and beta_eff vary less",
        f"Per seed, paired, in every context where neither network diverged: at matched training "
        f"loss (the probe steps at which each network's loss is within the range both pass "
        f"through while training, below {MATCH_START:g} x the first loss), BN's median loss band "
        f"relative to the loss (max - min of L(W - eta g) over the step sizes, / L(W)), its "
        f"median gradient-predictiveness band top (max over step sizes of ||grad L(W) - grad L(W "
        f"- eta g)||) and its median beta_eff are each below {LANDSCAPE_RATIO_MAX:g} x the "
        f"standard network's. Without a matched range, the early window (the first "
        f"{EARLY_FRACTION:g} of the run) decides. Also reported: the early window, the whole-run "
        f"medians, lambda_max and 2/lr.",
        "The paper reads figures 4 and 10 early in training, while both networks learn; over a "
        "whole run the comparison mixes a converged network with one still training (or one "
        "stuck on a plateau, whose landscape is flat because it does not learn). Matched "
        "training loss compares the two where they are at the same point of training; the "
        "loss band is relative to the loss, which differs between the networks.")
    parts, core = _Parts(), False
    for label, by in contexts(runs, ("none", "batch")):
        if not ("none" in by and "batch" in by):
            continue
        if not all(r.has("landscape/") for rs in by.values() for r in rs):
            continue
        pairs = [(b, n) for b, n in paired(by["batch"], by["none"])
                 if not (b.diverged or n.diverged)]
        if not pairs:
            parts.untested.append(f"{label} (a run diverged)")
            continue
        core = True
        parts.models.add(by["batch"][0].model)
        readings = [compare_landscape(b, n) for b, n in pairs]
        primary = "matched" if all("matched" in r for r in readings) else "early"
        for reading in READINGS:
            have = [r[reading] for r in readings if reading in r]
            if not have:
                c.numbers.append(f"{label}, {reading}: no comparable steps")
                continue
            texts = []
            for m, _ in MEASURES:
                bn, st = [h[m][0] for h in have], [h[m][1] for h in have]
                ratios = [x / y if x is not None and y else None for x, y in zip(bn, st)]
                texts.append(f"{m} BN/none {stat(ratios)}")
            c.numbers.append(f"{label}, {reading}{' (graded)' if reading == primary else ''}: "
                             + "; ".join(texts))
        lam = [(median_of(b, "curv/lambda_max"), median_of(n, "curv/lambda_max"))
               for b, n in pairs]
        if any(x is not None for pair in lam for x in pair):
            c.numbers.append(f"{label}: lambda_max (whole-run median) BN "
                             f"{stat([x for x, _ in lam])} | none {stat([y for _, y in lam])}; "
                             f"2/lr {2 / by['batch'][0].lr:.3g}")
        verdicts: dict[str, bool] = {}
        for reading in READINGS:
            results = []
            for r in readings:
                if reading not in r:
                    continue
                vals = r[reading]
                results.append(all(x is not None and y and x / y < LANDSCAPE_RATIO_MAX
                                    for x, y in vals.values()))
            if results:
                verdicts[reading] = all(results)
            if reading == primary:
                parts.check(f"{label}: BN smoother ({reading})", results)
        differing = [r for r, v in verdicts.items() if v != verdicts.get(primary)]
        if differing:
            c.numbers.append(f"{label}: the readings differ: {primary} says "
                             f"{'smoother' if verdicts[primary] else 'not smoother'}, "
                             + ", ".join(f"{r} says {'smoother' if verdicts[r] else 'not'}"
                                         for r in differing))
    return parts.verdict(c, core, runs)


def claim5(runs: list[Run]) -> Claim:
    c = Claim(
        5, "lp normalizations (l1, l2, linf) train as well as BN and smooth the landscape, "
           "though they control the activation distribution even less than no norm",
        f"Per seed, for each lp norm: it trains as well as BN (VGG: reaches {TRAIN_LEVEL:g} "
        f"training accuracy, final training accuracy within {LP_ACC_TOL:g} of BN's, and reaches "
        f"{TRAIN_LEVEL:g} before the standard network; DLN: final train loss below "
        f"{LP_LOSS_RATIO_MAX:g} x BN's and below the standard network's); its landscape is "
        f"smoother than the standard network's as claim 4 reads it (median gradient-"
        f"predictiveness and beta_eff below it, at matched loss or early); its activation moments "
        f"drift more from step to step than the standard network's. BN's own ratios are shown "
        f"beside.",
        "Section 3.3 compares each lp norm both with BN (trains as well, smooths as well) and with "
        "the standard network (smoother, and yet less control of the distribution).")
    parts, core = _Parts(), False
    smooth_measures = MEASURES[1:]
    for label, by in contexts(runs, ("none", "batch") + LP_NORMS):
        lps = [n for n in LP_NORMS if n in by]
        if not lps or "batch" not in by:
            continue
        core = True
        vgg = by["batch"][0].model == "vgg"
        for n in lps:
            pairs = paired(by[n], by["batch"])
            if vgg:
                c.numbers.append(f"{label} {n}: final train acc {stat([final_train_acc(a) for a, _ in pairs])}"
                                 f" | BN {stat([final_train_acc(b) for _, b in pairs])}; steps to "
                                 f"{TRAIN_LEVEL:g} {stat([steps_to(a) for a, _ in pairs])} | BN "
                                 f"{stat([steps_to(b) for _, b in pairs])}")
                parts.check(f"{label}: {n} trains as well as BN",
                            [trains(a) and final_train_acc(a) >= final_train_acc(b) - LP_ACC_TOL
                             for a, b in pairs if final_train_acc(b) is not None])
            else:
                c.numbers.append(f"{label} {n}: final train loss {stat([final_loss(a) for a, _ in pairs])}"
                                 f" | BN {stat([final_loss(b) for _, b in pairs])}")
                parts.check(f"{label}: {n} trains as well as BN",
                            [final_loss(a) <= LP_LOSS_RATIO_MAX * final_loss(b) for a, b in pairs
                             if final_loss(a) is not None and final_loss(b) is not None])
            if "none" not in by:
                parts.untested.append(f"{label}: {n} against the standard network")
                continue
            parts.models.add(by["none"][0].model)
            against = paired(by[n], by["none"])
            if vgg:
                parts.check(f"{label}: {n} trains faster than the standard network",
                            [steps_to(a) < steps_to(s) for a, s in against])
            else:
                parts.check(f"{label}: {n} ends below the standard network's loss",
                            [final_loss(a) < final_loss(s) for a, s in against
                             if None not in (final_loss(a), final_loss(s))])
            smooth, texts = [], []
            for a, s in against:
                if a.diverged or s.diverged:
                    continue
                readings = compare_landscape(a, s, smooth_measures)
                reading = "matched" if "matched" in readings else "early"
                if reading not in readings:
                    continue
                vals = readings[reading]
                smooth.append(all(x is not None and y and x / y < LANDSCAPE_RATIO_MAX
                                  for x, y in vals.values()))
                texts.append((reading, {m: x / y if x is not None and y else None
                                        for m, (x, y) in vals.items()}))
            if texts:
                bn_ratios = []
                for b, s in paired(by["batch"], by["none"]):
                    r = compare_landscape(b, s, smooth_measures)
                    reading = "matched" if "matched" in r else "early"
                    if reading in r:
                        bn_ratios.append({m: x / y if x is not None and y else None
                                          for m, (x, y) in r[reading].items()})
                c.numbers.append(
                    f"{label} {n}: vs none ({texts[0][0]}) " + "; ".join(
                        f"{m} {n}/none {stat([t[1][m] for t in texts])}"
                        + (f", BN/none {stat([r[m] for r in bn_ratios])}" if bn_ratios else "")
                        for m, _ in smooth_measures))
            parts.check(f"{label}: {n} smoother than the standard network", smooth)
            drift = []
            for a, s in against:
                da = moment_drift(a)
                ds = moment_drift(s)
                if None not in da + ds:
                    drift.append((da, ds))
            if drift:
                c.numbers.append(f"{label} {n}: moment drift (dmean, dvar) "
                                 f"{stat([d[0][0] for d in drift])}, {stat([d[0][1] for d in drift])}"
                                 f" | none {stat([d[1][0] for d in drift])}, "
                                 f"{stat([d[1][1] for d in drift])}")
            parts.check(f"{label}: {n}'s moments drift more than the standard network's",
                        [da[0] > ds[0] and da[1] > ds[1] for da, ds in drift])
    return parts.verdict(c, core, runs)


CLAIMS = (claim1, claim2, claim3, claim4, claim5)


def evaluate(runs: list[Run]) -> list[Claim]:
    return [check(runs) for check in CLAIMS]
