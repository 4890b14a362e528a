"""The paper's claims 1-5, each checked against the runs by a simple stated rule.

Runs are compared within a *context*: the same model, lr, optimizer (with momentum and weight
decay), init, init scale, depth, width and data; runs that differ only by seed are averaged.
Claims 1 and 2 use runs with the paper's recipe (plain SGD, Glorot init at scale 1).
"Final test accuracy" is the last logged `val/acc` (the test split, as in the paper); a diverged
run counts as failing to train. "Mean train accuracy" is the area under the `train/acc` curve
divided by its step span. Medians are over every logged step (and every instrumented layer).

1. BN trains faster and tolerates a larger lr (VGG). At every lr with runs with and without BN,
   BN's mean train accuracy is higher and its final test accuracy is not lower by more than
   FINAL_ACC_TOL; and at an lr >= HIGH_LR the net without BN ends at chance (final test accuracy
   <= CHANCE_ACC_MAX, or diverged) while BN ends above it.
2. Distributional stability is not why BN helps (VGG). Noisy BN's final test accuracy is within
   NOISY_GAP_MAX of BN's at the same lr; its activation moments drift more from step to step
   than BN's (median of act/*/dmean and act/*/dvar; otherwise the noise did not perturb them and
   the test says nothing); and the same noise without BN (norm=noise) ends at chance or diverges.
3. BN does not reduce ICS. In no (model, lr) pair does BN reduce ICS on both measures at once:
   median l2 difference below ICS_L2_RATIO x the standard net's and median cosine above the
   standard net's by more than ICS_COS_MARGIN.
4. BN smooths the landscape. In every pair where neither run diverged, BN's median loss-band
   width (loss_max - loss_min), median gradient-predictiveness band top (grad_diff_max) and
   median beta_eff are all below LANDSCAPE_RATIO_MAX x the standard net's.
5. lp norms train as well as BN and smooth the landscape. Each of l1, l2, linf ends within
   LP_ACC_TOL of BN's final test accuracy (VGG) or below LP_LOSS_RATIO_MAX x BN's final train
   loss (DLN), and its median beta_eff is below the standard net's.

Verdict: "shown" when every part that has runs holds and the claim's core part has runs,
"not shown" when a part fails, "no runs" when the core part has none; untested parts are named in
the note.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from bnstudy.analysis.runs import Run

CHANCE_ACC_MAX = 0.2      # 10 classes: chance is 0.1; at most this counts as "did not train"
HIGH_LR = 0.5             # claim 1: the lr at which the standard net fails in the paper
FINAL_ACC_TOL = 0.01      # claim 1: BN's final test accuracy may trail by this much
NOISY_GAP_MAX = 0.05      # claim 2: noisy BN within this of BN's final test accuracy
ICS_L2_RATIO = 0.5        # claim 3: BN's l2 below this x standard's counts as a reduction...
ICS_COS_MARGIN = 0.1      # ... together with its cosine above standard's by more than this
LANDSCAPE_RATIO_MAX = 1.0  # claim 4: BN / standard ratio of each smoothness measure
LP_ACC_TOL = 0.05         # claim 5 (VGG): lp norms within this of BN's final test accuracy
LP_LOSS_RATIO_MAX = 2.0   # claim 5 (DLN): lp norms' final train loss within this factor of BN's

SHOWN, NOT_SHOWN, NO_RUNS = "shown", "not shown", "no runs"
CONTEXT_KEYS = ("model", "lr", "optimizer", "momentum", "weight_decay", "init", "init_scale",
                "depth", "width", "data", "data.image_size", "data.num_samples", "data.dim",
                "reduction")
LP_NORMS = ("l1", "l2", "linf")


@dataclass
class Claim:
    number: int
    statement: str
    rule: str
    numbers: list[str] = field(default_factory=list)
    verdict: str = NO_RUNS
    note: str = ""


@dataclass
class _Parts:
    """Collects pass/fail per tested part; untested parts go to the note."""
    failed: list[str] = field(default_factory=list)
    passed: int = 0
    untested: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)

    def verdict(self, claim: Claim, core_tested: bool) -> Claim:
        if not core_tested:
            claim.verdict = NO_RUNS
        else:
            claim.verdict = NOT_SHOWN if self.failed else SHOWN
        notes = []
        if self.failed:
            notes.append("fails: " + "; ".join(self.failed))
        if self.untested:
            notes.append("not tested (no runs): " + "; ".join(self.untested))
        claim.note = ". ".join(notes)
        return claim


# ---- numbers from one run, averaged over seeds ----

def final_acc(run: Run) -> float | None:
    """Last test accuracy; a diverged run counts as chance (0.1)."""
    return 0.1 if run.diverged else run.last("val/acc")


def mean_train_acc(run: Run) -> float | None:
    """Area under the train/acc curve over its step span (the mean accuracy during training)."""
    pts = run.finite("train/acc")
    if len(pts) < 2:
        return pts[0][1] if pts else None
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def final_loss(run: Run) -> float | None:
    return math.inf if run.diverged else run.last("train/loss")


def median_of(run: Run, prefix: str, suffix: str = "") -> float | None:
    """Median of every finite value of the metrics `prefix*suffix` (all layers, all steps)."""
    values = [v for k in run.keys(prefix) if k.endswith(suffix) for _, v in run.finite(k)]
    return statistics.median(values) if values else None


def band_width(run: Run, name: str) -> float | None:
    lo, hi = dict(run.finite(f"landscape/{name}_min")), dict(run.finite(f"landscape/{name}_max"))
    widths = [hi[s] - lo[s] for s in lo if s in hi]
    return statistics.median(widths) if widths else None


def mean_over(runs: list[Run], fn) -> float | None:
    values = [v for v in (fn(r) for r in runs) if v is not None]
    return sum(values) / len(values) if values else None


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


# ---- contexts: runs that differ only by norm (and seed) ----

def contexts(runs: list[Run], norms: tuple[str, ...]) -> list[tuple[str, dict[str, list[Run]]]]:
    """[(context label, {norm: runs})] for runs whose norm is in `norms`, grouped by everything
    but norm and seed; the label names model and lr plus any other context key that varies."""
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for r in runs:
        if r.norm in norms:
            key = tuple(repr(r.get(k)) for k in CONTEXT_KEYS)
            groups.setdefault(key, {}).setdefault(r.norm, []).append(r)
    out = []
    for key, by_norm in groups.items():
        first = next(iter(by_norm.values()))[0]
        # name what tells this context from the others of the same model
        same_model = [k for k in groups if k[0] == key[0]]
        label = f"{first.model} lr {first.lr:g}" + "".join(
            f", {name}={first.get(name)}" for i, name in enumerate(CONTEXT_KEYS)
            if name not in ("model", "lr") and len({k[i] for k in same_model}) > 1)
        out.append((label, by_norm))
    return sorted(out, key=lambda item: item[0])


def _paper_vgg(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.model == "vgg" and r.paper_optimizer]


# ---- the claims ----

def claim1(runs: list[Run]) -> Claim:
    c = Claim(1, "BN trains faster and tolerates larger learning rates (VGG)",
              f"At every lr with runs with and without BN: BN's mean train accuracy (area under "
              f"the curve / steps) is higher and its final test accuracy is not lower by more "
              f"than {FINAL_ACC_TOL}. At an lr >= {HIGH_LR}: without BN the final test accuracy "
              f"is <= {CHANCE_ACC_MAX} (chance) or the run diverged, with BN it is above.")
    parts, core, high = _Parts(), False, False
    for label, by in contexts(_paper_vgg(runs), ("none", "batch")):
        if not ("none" in by and "batch" in by):
            continue
        core = True
        bn_auc, st_auc = mean_over(by["batch"], mean_train_acc), mean_over(by["none"], mean_train_acc)
        bn_fin, st_fin = mean_over(by["batch"], final_acc), mean_over(by["none"], final_acc)
        c.numbers.append(f"{label}: BN mean train acc {fmt(bn_auc)}, final test acc {fmt(bn_fin)}"
                         f" | no BN {fmt(st_auc)}, {fmt(st_fin)}"
                         + (" (diverged)" if any(r.diverged for r in by["none"]) else ""))
        if None in (bn_auc, st_auc, bn_fin, st_fin):
            parts.untested.append(f"{label}: accuracy not logged")
            continue
        parts.check(bn_auc > st_auc, f"{label}: BN's mean train accuracy is not higher")
        parts.check(bn_fin >= st_fin - FINAL_ACC_TOL, f"{label}: BN's final test accuracy is lower")
        if by["batch"][0].lr >= HIGH_LR:
            high = True
            parts.check(st_fin <= CHANCE_ACC_MAX, f"{label}: no BN trains ({fmt(st_fin)})")
            parts.check(bn_fin > CHANCE_ACC_MAX, f"{label}: BN stays at chance ({fmt(bn_fin)})")
    if core and not high:
        parts.untested.append(f"runs with and without BN at lr >= {HIGH_LR}")
    return parts.verdict(c, core)


def claim2(runs: list[Run]) -> Claim:
    c = Claim(2, "Distributional stability is not why BN helps: noisy BN trains about as well "
                 "as BN; the same noise without BN stops training (VGG)",
              f"At each lr: noisy BN's final test accuracy is within {NOISY_GAP_MAX} of BN's; "
              f"its activation moments drift more from step to step than BN's (median |change| "
              f"of the units' mean and variance between consecutive steps, all instrumented "
              f"layers); the noise without BN (norm=noise) ends at final test accuracy <= "
              f"{CHANCE_ACC_MAX} or diverges.")
    parts, core, control = _Parts(), False, False
    for label, by in contexts(_paper_vgg(runs), ("batch", "noisy_batch", "noise", "none")):
        if "batch" in by and "noisy_batch" in by:
            core = True
            bn, nz = by["batch"], by["noisy_batch"]
            gap = None
            bn_fin, nz_fin = mean_over(bn, final_acc), mean_over(nz, final_acc)
            if bn_fin is not None and nz_fin is not None:
                gap = bn_fin - nz_fin
                parts.check(gap <= NOISY_GAP_MAX, f"{label}: noisy BN trails BN by {fmt(gap)}")
            else:
                parts.untested.append(f"{label}: test accuracy not logged")
            drift = {}
            for name, rs in (("BN", bn), ("noisy BN", nz)):
                drift[name] = (mean_over(rs, lambda r: median_of(r, "act/", "/dmean")),
                               mean_over(rs, lambda r: median_of(r, "act/", "/dvar")))
            c.numbers.append(
                f"{label}: final test acc BN {fmt(bn_fin)}, noisy BN {fmt(nz_fin)} (gap {fmt(gap)})"
                f"; moment drift (dmean, dvar) BN {fmt(drift['BN'][0])}, {fmt(drift['BN'][1])}"
                f" | noisy BN {fmt(drift['noisy BN'][0])}, {fmt(drift['noisy BN'][1])}")
            if None in drift["BN"] + drift["noisy BN"]:
                parts.untested.append(f"{label}: activation statistics not logged")
            else:
                parts.check(drift["noisy BN"][0] > drift["BN"][0]
                            and drift["noisy BN"][1] > drift["BN"][1],
                            f"{label}: noisy BN's moments do not drift more than BN's")
        if "noise" in by:
            control = True
            fin = mean_over(by["noise"], final_acc)
            c.numbers.append(f"{label}: noise without BN final test acc {fmt(fin)}"
                             + (" (diverged)" if any(r.diverged for r in by["noise"]) else ""))
            if fin is not None:
                parts.check(fin <= CHANCE_ACC_MAX, f"{label}: noise without BN trains ({fmt(fin)})")
    if not control:
        parts.untested.append("the noise-without-BN control (norm=noise)")
    return parts.verdict(c, core)


def claim3(runs: list[Run]) -> Claim:
    c = Claim(3, "BN does not reduce internal covariate shift (gradient sense); it often "
                 "increases it",
              f"In no (model, lr) pair does BN reduce ICS on both measures at once: median "
              f"||G - G'|| below {ICS_L2_RATIO} x the standard net's and median cos(G, G') above "
              f"the standard net's by more than {ICS_COS_MARGIN} (medians over steps and layers).")
    parts, core = _Parts(), False
    for label, by in contexts(runs, ("none", "batch")):
        if not ("none" in by and "batch" in by):
            continue
        l2 = {n: mean_over(by[n], lambda r: median_of(r, "ics/l2/")) for n in ("batch", "none")}
        cos = {n: mean_over(by[n], lambda r: median_of(r, "ics/cos/")) for n in ("batch", "none")}
        if None in (*l2.values(), *cos.values()):
            continue
        core = True
        ratio = l2["batch"] / l2["none"] if l2["none"] else math.inf
        c.numbers.append(f"{label}: l2 BN {fmt(l2['batch'])} vs {fmt(l2['none'])} (ratio "
                         f"{fmt(ratio)}); cos BN {fmt(cos['batch'])} vs {fmt(cos['none'])}")
        reduced = ratio < ICS_L2_RATIO and cos["batch"] > cos["none"] + ICS_COS_MARGIN
        parts.check(not reduced, f"{label}: BN reduces ICS")
    return parts.verdict(c, core)


def claim4(runs: list[Run]) -> Claim:
    c = Claim(4, "BN makes the loss landscape smoother: loss, gradient and beta_eff vary less",
              f"In every (model, lr) pair where neither run diverged: BN's median loss-band width, "
              f"median gradient-predictiveness band top (max over step sizes of ||grad(W) - "
              f"grad(W - eta g)||) and median beta_eff are each below {LANDSCAPE_RATIO_MAX} x "
              f"the standard net's.")
    parts, core = _Parts(), False
    measures = (("loss band", lambda r: band_width(r, "loss")),
                ("grad diff", lambda r: median_of(r, "landscape/grad_diff_max")),
                ("beta_eff", lambda r: median_of(r, "landscape/beta_eff")))
    for label, by in contexts(runs, ("none", "batch")):
        if not ("none" in by and "batch" in by):
            continue
        if any(r.diverged for rs in by.values() for r in rs):
            parts.untested.append(f"{label} (a run diverged)")
            continue
        vals = {(m, n): mean_over(by[n], fn) for m, fn in measures for n in ("batch", "none")}
        if None in vals.values():
            continue
        core = True
        texts = []
        for m, _ in measures:
            bn, st = vals[(m, "batch")], vals[(m, "none")]
            ratio = bn / st if st else math.inf
            texts.append(f"{m} BN {fmt(bn)} vs {fmt(st)} (ratio {fmt(ratio)})")
            parts.check(ratio < LANDSCAPE_RATIO_MAX, f"{label}: BN's {m} is not smaller")
        c.numbers.append(f"{label}: " + "; ".join(texts))
    return parts.verdict(c, core)


def claim5(runs: list[Run]) -> Claim:
    c = Claim(5, "lp normalizations (l1, l2, linf) train as well as BN and smooth the landscape",
              f"At each (model, lr): every lp norm's final test accuracy is within {LP_ACC_TOL} "
              f"of BN's (VGG) or its final train loss below {LP_LOSS_RATIO_MAX} x BN's (DLN); "
              f"its median beta_eff is below the standard net's.")
    parts, core = _Parts(), False
    for label, by in contexts(runs, ("none", "batch") + LP_NORMS):
        lps = [n for n in LP_NORMS if n in by]
        if not lps or "batch" not in by:
            continue
        core = True
        vgg = by["batch"][0].model == "vgg"
        fn = final_acc if vgg else final_loss
        bn = mean_over(by["batch"], fn)
        beta = {n: mean_over(rs, lambda r: median_of(r, "landscape/beta_eff"))
                for n, rs in by.items()}
        texts = [f"{'final test acc' if vgg else 'final train loss'} BN {fmt(bn)}"]
        for n in lps:
            v = mean_over(by[n], fn)
            texts.append(f"{n} {fmt(v)}")
            if v is None or bn is None:
                parts.untested.append(f"{label} {n}: training metric not logged")
            elif vgg:
                parts.check(v >= bn - LP_ACC_TOL, f"{label}: {n} trails BN ({fmt(v)} vs {fmt(bn)})")
            else:
                parts.check(v <= bn * LP_LOSS_RATIO_MAX,
                            f"{label}: {n}'s loss above {LP_LOSS_RATIO_MAX} x BN's")
        st_beta = beta.get("none")
        texts.append("beta_eff " + ", ".join(f"{n} {fmt(beta[n])}" for n in ["none", *lps]
                                             if n in beta))
        for n in lps:
            if st_beta is None or beta[n] is None:
                parts.untested.append(f"{label} {n}: beta_eff vs the standard net")
            else:
                parts.check(beta[n] < st_beta, f"{label}: {n}'s beta_eff is not below standard's")
        c.numbers.append(f"{label}: " + "; ".join(texts))
    return parts.verdict(c, core)


CLAIMS = (claim1, claim2, claim3, claim4, claim5)


def evaluate(runs: list[Run]) -> list[Claim]:
    return [check(runs) for check in CLAIMS]
