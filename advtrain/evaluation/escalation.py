"""Escalation as data: which fired checks call for which stronger attacks, and how the report
says so.

Each :class:`Rule` of :data:`RULES` names the checks that trigger it (:class:`.CheckName`), the
attacks it runs on the points still standing (in order, each seeded from the rule's and the
step's name), and the sentence the report gives for it; :func:`escalate` applies the table in
order. The remedies follow Athalye, Carlini & Wagner (ICML 2018) and Carlini et al. ("On
evaluating adversarial robustness", 2019): straight-through gradients (BPDA without knowing the
defence) and gradient-free attacks where the gradients are masked, margin and DLR losses
(Croce & Hein 2020) where the softmax saturates, longer runs where the optimisation had not
converged.

With two classes the DLR losses are constant (:data:`.steps.DLR_SKIPPED`), so every rule that
would ascend DLR ascends the CW margin instead (:func:`.steps.signal_loss`): APGD-T through the
straight-through gradients becomes APGD-CW, and the DLR runs of the saturated-softmax and
loss-still-improving rules become margin runs; the sentences say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..attacks import APGDT, PGD, HopSkipJump, Square
from .cascade import Cascade
from .context import EvalContext
from .findings import MASKING_CHECKS, VERDICT, Check, CheckName, Escalation
from .steps import Step, binary, gradient_step, signal_loss

#: A second Square run covers this share of the survivors (at least SECOND_SQUARE_LEAST of them),
#: those closest to the boundary by their minimum-norm margin.
SECOND_SQUARE_SHARE, SECOND_SQUARE_LEAST = 0.25, 50
#: The norms with APGD, APGD-T and Square here; l1 has PGD with the sparse l1 step only.
LP_NORMS = frozenset({"linf", "l2"})
ALL_NORMS = frozenset({"linf", "l2", "l1"})


@dataclass(frozen=True)
class Planned:
    """One attack of a rule: built from the context, run through the attacked model or its
    straight-through repair, and only when the check ``when`` fired (if given)."""

    build: Callable[[EvalContext], Step]
    straight_through: bool = False
    when: CheckName | None = None


@dataclass(frozen=True)
class Firing:
    """What a rule's sentence may mention: the context, the checks that fired it, and which
    standing points its attacks ran on (in words)."""

    ctx: EvalContext
    checks: frozenset[CheckName]
    chosen: str


@dataclass(frozen=True)
class Rule:
    """A stronger attack the evaluation runs on its own when one of ``checks`` fires.

    Attributes:
        name: the rule's name; scopes its steps' seeds and names it in ``unless``.
        checks: any of these firing calls for the rule (at verdict severity when
            ``verdict_only``).
        steps: the attacks, in order, on the points still standing.
        describe: the report's sentence for what was done.
        norms: the threat-model norms the rule applies to.
        closest: run only on the standing points closest to the boundary
            (``SECOND_SQUARE_SHARE`` of them, at least ``SECOND_SQUARE_LEAST``).
        unless: names of rules that, when they ran, make this one redundant.
    """

    name: str
    checks: frozenset[CheckName]
    steps: tuple[Planned, ...]
    describe: Callable[[Firing], str]
    verdict_only: bool = False
    norms: frozenset[str] = ALL_NORMS
    closest: bool = False
    unless: frozenset[str] = frozenset()

    def fired(self, found: list[Check]) -> frozenset[CheckName]:
        """The checks of this rule that fired among ``found``."""
        return frozenset(
            CheckName(c.name)
            for c in found
            if c.triggered
            and c.name in self.checks
            and (c.severity == VERDICT or not self.verdict_only)
        )


def _straight_through_gradient(ctx: EvalContext) -> Step:
    return gradient_step(
        ctx.threat, restarts=2, batch_size=ctx.batch_size, note="(straight-through)"
    )


def _longer(loss: str) -> Callable[[EvalContext], Step]:
    """The white-box attack with ``loss`` (the margin for DLR with two classes), 400 iterations
    and 3 restarts."""

    def build(ctx: EvalContext) -> Step:
        return gradient_step(
            ctx.threat,
            loss=signal_loss(loss, ctx.n_classes),
            steps=400,
            restarts=3,
            batch_size=ctx.batch_size,
        )

    return build


def _targeted_straight_through(ctx: EvalContext) -> Step:
    """APGD-T through the straight-through gradients; with two classes APGD with the margin
    loss (targeted DLR is constant there)."""
    if binary(ctx.n_classes):
        return gradient_step(
            ctx.threat, loss="cw", batch_size=ctx.batch_size, note="(straight-through)"
        )
    return Step(
        "apgd-t (straight-through)",
        APGDT(ctx.threat, n_targets=min(9, ctx.n_classes - 1), batch_size=ctx.batch_size),
    )


def _dlr(f: Firing) -> str:
    """The loss the rules call DLR, in words: the margin for two classes."""
    return "the CW margin (DLR skipped: 2 classes)" if binary(f.ctx.n_classes) else "the DLR"


RULES: tuple[Rule, ...] = (
    Rule(
        name="masking",
        checks=MASKING_CHECKS,
        verdict_only=True,
        norms=LP_NORMS,
        steps=(
            Planned(_straight_through_gradient, straight_through=True),
            Planned(_targeted_straight_through, straight_through=True),
            Planned(
                lambda ctx: Step(
                    "square 10k x2",
                    Square(ctx.threat, n_queries=10000, restarts=2, batch_size=ctx.batch_size),
                )
            ),
            # Label-only, where the gradients vanish: the scores are then often flat too (hard
            # labels, one-hot vectors, probabilities saturated to exact 0 and 1) and Square has
            # nothing to climb. Where only Square beat the gradients, the scores carry the
            # signal and HopSkipJump's 25,000 queries per survivor would add nothing.
            Planned(
                lambda ctx: Step("hopskipjump", HopSkipJump(ctx.threat, batch_size=ctx.batch_size)),
                when=CheckName.ZERO_GRADIENTS,
            ),
        ),
        describe=lambda f: (
            "straight-through (BPDA) gradients for step functions, APGD-CE with restarts, "
            + ("APGD-CW (DLR skipped: 2 classes)" if binary(f.ctx.n_classes) else "APGD-T")
            + ", Square with 10,000 queries and 2 restarts"
            + (", and HopSkipJump (label-only)" if CheckName.ZERO_GRADIENTS in f.checks else "")
        ),
    ),
    Rule(
        name="masking (l1)",
        checks=MASKING_CHECKS,
        verdict_only=True,
        norms=frozenset({"l1"}),
        steps=(Planned(_straight_through_gradient, straight_through=True),),
        describe=lambda f: (
            "straight-through (BPDA) gradients for step functions, PGD-l1 with restarts; there "
            "is no gradient-free l1 attack here, so the robust accuracy is only an upper bound"
        ),
    ),
    # A warning only (a few points): Square again, with fresh randomness, on the survivors
    # whose minimum adversarial perturbation found lies closest to eps.
    Rule(
        name="second square",
        checks=frozenset({CheckName.BLACK_BOX}),
        norms=LP_NORMS,
        closest=True,
        unless=frozenset({"masking"}),
        steps=(
            Planned(
                lambda ctx: Step(
                    "square (second run)",
                    Square(ctx.threat, n_queries=5000, batch_size=ctx.batch_size),
                )
            ),
        ),
        describe=lambda f: f"a second Square run (5,000 queries, new seed) on {f.chosen}",
    ),
    Rule(
        name="saturated softmax",
        checks=frozenset({CheckName.SATURATED_SOFTMAX}),
        steps=(
            Planned(
                lambda ctx: gradient_step(
                    ctx.threat, loss=signal_loss("dlr", ctx.n_classes), batch_size=ctx.batch_size
                )
            ),
            Planned(
                lambda ctx: Step(
                    "pgd-cw",
                    PGD(ctx.threat, steps=100, loss="cw", restarts=2, batch_size=ctx.batch_size),
                )
            ),
        ),
        describe=lambda f: f"{f.ctx.white_box} with {_dlr(f)} loss and PGD with the CW margin loss",
    ),
    Rule(
        name="loss still improving",
        checks=frozenset({CheckName.LOSS_IMPROVING}),
        steps=(Planned(_longer("ce")), Planned(_longer("dlr"))),
        describe=lambda f: (
            f"{f.ctx.white_box} with the CE and {_dlr(f)} loss, 400 iterations and 3 restarts"
        ),
    ),
)


def escalate(
    ctx: EvalContext, state: Cascade, found: list[Check], rules: tuple[Rule, ...] = RULES
) -> list[Escalation]:
    """Apply ``rules`` in order to the checks ``found``: each rule whose checks fired (and that
    applies to the norm, and no rule of its ``unless`` ran) runs its steps on ``state``, and is
    reported with the robust accuracy before and after it."""
    ran: set[str] = set()
    escalations = []
    for rule in rules:
        checks = rule.fired(found)
        if not checks or ctx.threat.norm not in rule.norms or ran & rule.unless:
            continue
        ran.add(rule.name)
        before = state.robust_accuracy
        among, chosen = None, "every surviving point"
        if rule.closest:
            among = state.closest_standing(SECOND_SQUARE_SHARE, least=SECOND_SQUARE_LEAST)
            if len(among) != len(state.indices()):
                chosen = f"the {len(among)} surviving points with the smallest robust margin"
        for planned in rule.steps:
            if planned.when is not None and planned.when not in checks:
                continue
            step = planned.build(ctx).seeded(ctx.seed, scope=f"{rule.name}: ")
            model = ctx.repaired_model if planned.straight_through else ctx.attack_model
            state.run(step, model, among=among)
        escalations.append(
            Escalation(
                ", ".join(sorted(c.value for c in checks)),
                rule.describe(Firing(ctx, checks, chosen)),
                before,
                state.robust_accuracy,
            )
        )
    return escalations
