"""ShapPruning: Shapley-value pruning (Guan, Tu, He, Tao, "Few-shot Backdoor Defense Using Shapley
Estimation", CVPR 2022). No public reference code: this follows the paper, and every choice it
leaves open is named in `ShapPruning.deviations` and the config's docstring.

Few-shot (a handful of clean images, e.g. one per class) or data-free (images synthesised from the
model, `hubdefend.synthesis`). Labels are never used.

1. The target: given, or shortlisted from the images under neuron noise (`hubdefend.target`) and
   decided by the smallest trigger reversed Neural Cleanse style from the same images
   (`hubdefend.inversion`); the target's reversed trigger is kept.
2. The game: the players are the neurons; a coalition keeps its neurons and masks the others (gamma
   to 0, beta kept, as pruning does). Its value is backdoor behaviour minus clean behaviour: the
   mean target probability on reversed-trigger images (over the images the original model does not
   already send to the target) minus the mean probability of the original model's own answer on the
   clean images. Removing a backdoor neuron lowers the first term only; removing a neuron that every
   answer needs lowers both, so it earns little; removing one whose loss sends every image to the
   target raises the first term and earns a negative value.
3. Shapley values by Monte-Carlo permutation sampling: each walk removes the players in the
   permutation's order from the full model and credits each with the drop of the value it caused;
   a walk stops (truncation) once the backdoor term is gone, the rest being credited 0. The
   paper's two accelerations: a discarding threshold (a candidate whose mean contribution stays
   below a small share of the full model's backdoor term is no longer estimated: it stays in the
   network and out of the walks) and epsilon-greedy sampling (a permutation is uniformly random
   with probability epsilon, otherwise greedy: the current best estimates first, so the backdoor
   collapses in a few steps and the walk is short). Many coalitions are evaluated in ONE forward: the batch holds one chunk of images per
   coalition, each with its own masks.
4. The score is minus the Shapley value (lower = prune first). The defense's own rule
   (`DefenseOutput.own_count`): walk down the ranking, pruning while the images' clean answers
   hold and the Shapley values stay large, at most 1% of the neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hubdefend.defenses import register_defense
from hubdefend.defenses.base import Defense, DefenseConfig, DefenseOutput, NeuronScores
from hubdefend.errors import DefenseError, MaskError
from hubdefend.inversion import InversionConfig, invert_trigger
from hubdefend.masks import NeuronMasks, _MaskHook
from hubdefend.target import infer_target
from hubdefend.training import logits_of


@dataclass(frozen=True)
class ShapPruningConfig(DefenseConfig):
    """ShapPruning's settings. The paper fixes the method, not these numbers; they are ours, sized so
    that a ResNet-18 at 32 px is repaired in about a minute on a CPU.

    Attributes:
        target: the backdoor's target class when known; None infers it (see `ShapPruning`).
        eps: neuron-noise budget of the target inference (CNP's value).
        target_draws: random starts of the neuron noise (a few images are a single batch, one draw).
        target_candidates: classes the noise shortlists; a trigger is reversed for each and the
            smallest one names the target (Neural Cleanse's criterion).
        inversion_epochs: Neural Cleanse epochs of the trigger reversal.
        inversion_batches: batches per reversal epoch (each holds all of a few images).
        screen_samples: random coalitions of the first-order screen that orders the neurons before
            sampling (Owen's formula: coalitions keep each neuron with probability t, t uniform).
        pool_fraction: share of the neurons, highest first-order estimates first, that enter the
            Shapley sampling as candidates; the others are discarded at once.
        walks: Monte-Carlo permutations.
        epsilon: probability that a permutation is uniformly random rather than greedy.
        clean_weight: weight of the clean term of the value.
        truncation: a walk stops once the backdoor term is at most this share of the full model's.
        discard_threshold: after ``min_samples`` contributions, a candidate whose mean is below
            this share of the full model's backdoor term is discarded.
        min_samples: contributions measured before a walk's truncation that a candidate needs
            before it can be discarded.
        max_fraction: the own rule prunes at most this share of the neurons (the paper: under 1%).
        relative_threshold: the own rule prunes only neurons whose Shapley value is at least this
            share of the largest one (and at least the discarding threshold).
        stop_effect: the own rule stops once the backdoor term is at most this share of the full
            model's.
        clean_drop: the own rule skips a neuron whose pruning would lower the clean term (the mean
            probability of the original's answers on the clean images) by more than this.
        synthetic_per_class: images synthesised per class in the data-free mode.
        synthesis_steps: DeepInversion steps of the data-free mode.
        max_images: the game is played on at most this many images (a seeded draw when more are
            given): every coalition is evaluated on all of them.
        batch_images: images per forward when many coalitions are evaluated together.
    """

    target: int | None = None
    eps: float = 0.4
    target_draws: int = 16
    target_candidates: int = 2
    inversion_epochs: int = 40
    inversion_batches: int = 10
    screen_samples: int = 64
    pool_fraction: float = 0.03
    walks: int = 40
    epsilon: float = 0.3
    clean_weight: float = 1.0
    truncation: float = 0.05
    discard_threshold: float = 0.005
    min_samples: int = 3
    max_fraction: float = 0.01
    relative_threshold: float = 0.2
    stop_effect: float = 0.05
    clean_drop: float = 0.02
    synthetic_per_class: int = 2
    synthesis_steps: int = 200
    max_images: int = 20
    batch_images: int = 512


# -- many coalitions in one forward ---------------------------------------------------------------


class _CoalitionHook(_MaskHook):
    """A mask hook applying coalition ``s``'s 0/1 mask to the ``s``-th equal chunk of the batch."""

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        keep = self.masks.coalitions[self.index]  # (S, neurons)
        group = self.group
        if group.neuron_width > 1:
            keep = keep.repeat_interleave(group.neuron_width, dim=1)
        count, channels = keep.shape
        dim = group.channel_dim % y.ndim
        if y.shape[dim] != channels or y.shape[0] % count:
            raise MaskError(
                f"Layer {group.name!r} produced a tensor of shape {tuple(y.shape)}, which does not split "
                f"into {count} coalitions of {channels} features on dim {group.channel_dim}."
            )
        chunks = y.unflatten(0, (count, -1))
        shape = [1] * chunks.ndim
        shape[0], shape[dim + 1] = count, channels
        keep = keep.to(y.dtype).view(shape)
        beta = self._beta()
        if beta is None:
            return (chunks * keep).flatten(0, 1)
        # A masked neuron outputs its shift (beta), as a pruned one does.
        shift = beta.to(y.dtype).view([1 if i != dim + 1 else channels for i in range(chunks.ndim)])
        return torch.addcmul((1 - keep) * shift, chunks, keep).flatten(0, 1)


class _CoalitionMasks(NeuronMasks):
    """`NeuronMasks` whose hooks give each chunk of the batch its own coalition (``coalitions``: one
    ``S x neurons`` tensor per group, set before each forward)."""

    # Always an activation hook: the fast path (swapping gamma for one forward) cannot give each
    # chunk of the batch its own gamma.
    swap_affine = False

    def __init__(self, groups) -> None:
        super().__init__(groups)
        self.coalitions: list[torch.Tensor] = []

    def _hook(self, index, group, model) -> _CoalitionHook:
        return _CoalitionHook(self, index, group, model)


class _Game:
    """The backdoor game on a few images: players are the bakeable neurons, flattened in group
    order; a coalition is a 0/1 vector over them (1 = kept)."""

    def __init__(
        self, model, groups, normalize, clean, triggered, target, accelerator, *, batch_images, clean_weight
    ) -> None:
        self.model = model
        self.sizes = [g.num_neurons for g in groups]
        self.players = sum(self.sizes)
        self.normalize = normalize
        self.device = accelerator.device
        self.accelerator = accelerator
        self.target = target
        self.clean_weight = clean_weight
        self.masks = _CoalitionMasks(groups)
        clean = clean.to(self.device)
        with torch.no_grad():
            self.answers = self._logits(clean).argmax(1)
        # Images the original already sends to the target show no backdoor behaviour: left out of it.
        self.counted = self.answers != target
        if not self.counted.any():
            raise DefenseError(
                f"The model predicts class {target} for every image it was given, so its backdoor cannot be "
                "measured: give images of other classes."
            )
        self.images = torch.cat([clean, triggered.to(self.device)])
        self.per_forward = max(1, batch_images // len(self.images))

    def _logits(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return logits_of(self.model(self.normalize(pixels))).float()

    def _outcome(self, coalitions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backdoor term and clean term of each coalition, in one forward."""
        self.masks.coalitions = list(coalitions.split(self.sizes, dim=1))
        count, n = len(coalitions), len(self.images) // 2
        probs = self._logits(self.images.repeat(count, 1, 1, 1)).softmax(1).view(count, 2 * n, -1)
        backdoor = probs[:, n:, self.target][:, self.counted].mean(1)
        clean = probs[:, :n].gather(2, self.answers.view(1, n, 1).expand(count, n, 1)).squeeze(2).mean(1)
        return backdoor, clean

    def value(self, backdoor: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return backdoor - self.clean_weight * clean

    @torch.no_grad()
    def evaluate(self, coalitions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Value, backdoor term and clean term of every row of ``coalitions`` (S x players)."""
        rows = []
        for chunk in coalitions.to(self.device).split(self.per_forward):
            backdoor, clean = self._outcome(chunk.float())
            rows.append(torch.stack([self.value(backdoor, clean), backdoor, clean], 1).cpu())
        values, backdoor, clean = torch.cat(rows).double().unbind(1)
        return values, backdoor, clean

    def gradients(self, coalitions: torch.Tensor) -> torch.Tensor:
        """d value / d mask of every player at every coalition (first-order marginal contributions)."""
        grads = []
        for chunk in coalitions.to(self.device).split(self.per_forward):
            chunk = chunk.float().requires_grad_(True)
            backdoor, clean = self._outcome(chunk)
            (grad,) = torch.autograd.grad(self.value(backdoor, clean).sum(), chunk)
            grads.append(grad.cpu())
        return torch.cat(grads)


# -- the defense ----------------------------------------------------------------------------------


@register_defense("shap")
class ShapPruning(Defense):
    """Shapley-value pruning. Without a given target, the target is shortlisted from neuron noise
    (CNP's rule, `hubdefend.target.infer_target`, repeated over ``target_draws`` random starts) and
    decided by Neural Cleanse's criterion among the shortlist: the class whose reversed trigger is
    smallest."""

    config_cls = ShapPruningConfig
    needs_data = False
    needs_labels = False
    few_shot = True
    deviations = (
        "No public code. Value function (ours): mean target probability on reversed-trigger images "
        "minus clean_weight times the mean probability of the original's own answer on the clean "
        "images, so that neurons every answer needs are not credited with the backdoor.",
        "Candidates: a first-order screen (the gradient of the value with respect to each neuron's "
        "mask at random coalitions, averaged as in Owen's formula) keeps the best pool_fraction of the "
        "neurons for Monte-Carlo sampling; the others are discarded before any walk.",
        "Discarded neurons stay in the network during later walks (they are not players any more).",
        "Epsilon-greedy: a permutation is uniformly random with probability epsilon, else the "
        "candidates ordered by their current estimate plus noise of the size of its standard error; "
        "the estimate is the mean contribution over all walks. Walks truncate on the backdoor term.",
        "Own rule: down the Shapley ranking, among neurons whose value is at least relative_threshold "
        "of the largest, a neuron is pruned unless it lowers the mean probability of the original's "
        "answers on the clean images by more than clean_drop (it is then protected); stop once the "
        "reversed trigger's target probability is at most stop_effect of the original's, or at "
        "max_fraction (1%) of the neurons.",
        "Target: shortlisted by neuron noise (CNP's rule, several random starts), decided by the "
        "smallest reversed trigger among the shortlist; the paper runs Neural Cleanse over every class.",
        "Trigger reversal: Neural Cleanse (`hubdefend.inversion`), inversion_batches batches of the "
        "few images per epoch.",
        "Data-free images come from DeepInversion (`hubdefend.synthesis`), class-balanced; the "
        "paper reverses data its own way.",
        "At most max_images images play the game (a seeded draw when more are given).",
    )

    def score(self, model, groups, data, *, normalize, num_classes, accelerator, seed=0, progress=True):
        cfg: ShapPruningConfig = self.config
        notes: dict = {}
        model.eval().requires_grad_(False).to(accelerator.device)
        if data is None:
            data = self._synthesize(model, normalize, num_classes, accelerator, seed, progress, notes)
        else:
            notes["images"] = "defender data (labels unused)"
        reversed_trigger = self._trigger(
            model, groups, data, normalize, num_classes, accelerator, seed, progress, notes
        )
        notes["inversion"] = reversed_trigger.to_dict()
        clean = _images_of(data, cfg.max_images, seed)
        game = _Game(
            model, [g for g in groups if g.bakeable], normalize, clean, reversed_trigger.apply(clean),
            reversed_trigger.target, accelerator, batch_images=cfg.batch_images, clean_weight=cfg.clean_weight,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        with game.masks.attached_to(model):
            shapley, sampling_notes = self._estimate(game, generator)
            scores, own_count, rule_notes = self._own_rule(game, shapley)
        notes.update(sampling_notes)
        notes.update(rule_notes)
        values, offset = {}, 0
        for group in groups:
            if group.bakeable:
                values[group.name] = scores[offset : offset + group.num_neurons].clone()
                offset += group.num_neurons
            else:
                values[group.name] = torch.zeros(group.num_neurons)
        return DefenseOutput(
            NeuronScores(groups, values),
            reversed_trigger,
            reversed_trigger.target,
            notes,
            own_count=own_count,
        )

    # -- inputs, target and trigger -----------------------------------------------------------------
    def _synthesize(self, model, normalize, num_classes, accelerator, seed, progress, notes):
        from hubdefend.defenses.dbrpu import _input_size
        from hubdefend.synthesis import synthesize

        cfg: ShapPruningConfig = self.config
        synthetic = synthesize(
            model, num_classes=num_classes, normalize=normalize, image_size=_input_size(model),
            n=cfg.synthetic_per_class * num_classes, seed=seed, accelerator=accelerator, progress=progress,
            steps=cfg.synthesis_steps,
        )  # fmt: skip
        notes["images"] = "synthetic"
        notes["synthesis"] = synthetic.facts.to_dict()
        return synthetic

    def _trigger(self, model, groups, data, normalize, num_classes, accelerator, seed, progress, notes):
        """The reversed trigger of the given target, or of the inferred one (see the class)."""
        cfg: ShapPruningConfig = self.config
        config = InversionConfig(
            epochs=cfg.inversion_epochs,
            batches_per_epoch=cfg.inversion_batches,
            batch_size=min(128, len(data)),
        )

        def reverse(target: int):
            return invert_trigger(
                model, data, normalize, target, config=config, accelerator=accelerator, progress=progress, seed=seed
            )  # fmt: skip

        if cfg.target is not None:
            if not 0 <= cfg.target < num_classes:
                raise DefenseError(
                    f"shap target={cfg.target} is not one of the model's {num_classes} classes "
                    f"(0..{num_classes - 1}); give a valid class or leave target unset to infer it."
                )
            return reverse(cfg.target)
        growth = torch.zeros(num_classes, dtype=torch.long)
        for draw in range(max(1, cfg.target_draws)):
            evidence = infer_target(
                model, groups, data, normalize=normalize, num_classes=num_classes, accelerator=accelerator,
                eps=cfg.eps, seed=seed + draw,
            )  # fmt: skip
            growth += torch.as_tensor(evidence.growth)
        shortlist = growth.argsort(descending=True, stable=True)[: max(1, cfg.target_candidates)].tolist()
        shortlist = [c for c in shortlist if growth[c] > 0] or shortlist[:1]
        triggers = [reverse(c) for c in shortlist]
        working = [t for t in triggers if t.reached_threshold] or triggers
        chosen = min(working, key=lambda t: t.l1_norm)
        notes["target_evidence"] = {
            "noise_growth": growth.tolist(),
            "shortlist": shortlist,
            "l1_norms": [round(t.l1_norm, 3) for t in triggers],
            "target": chosen.target,
        }
        return chosen

    # -- Shapley estimation -------------------------------------------------------------------------
    def _estimate(self, game: _Game, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Shapley value of every player: the Monte-Carlo mean for the candidates, 0 for the rest."""
        cfg: ShapPruningConfig = self.config
        full_value, full_backdoor, _ = (float(v[0]) for v in game.evaluate(torch.ones(1, game.players)))
        if full_backdoor <= 0.5:
            # No backdoor behaviour to attribute (a clean model, or a trigger that did not reverse):
            # every value is 0 and the own rule prunes nothing.
            reason = (
                f"the reversed trigger sends the images to class {game.target} with mean probability "
                f"{full_backdoor:.2f} only: no backdoor behaviour to attribute"
            )
            return torch.zeros(game.players), {"full_backdoor": round(full_backdoor, 4), "skipped": reason}
        screen = self._screen(game, generator)
        pool_size = max(1, min(game.players, math.ceil(cfg.pool_fraction * game.players)))
        candidates = screen.topk(pool_size).indices.tolist()
        sums = torch.zeros(game.players, dtype=torch.float64)
        squares = torch.zeros(game.players, dtype=torch.float64)
        counts = torch.zeros(game.players, dtype=torch.long)
        measured = torch.zeros(game.players, dtype=torch.long)
        active = list(candidates)
        walk_lengths = []
        for _ in range(cfg.walks):
            if not active:
                break
            order = self._permutation(active, sums, squares, counts, generator)
            marginals, evaluated = self._walk(game, order, full_value, full_backdoor)
            walk_lengths.append(evaluated)
            index = torch.as_tensor(order)
            sums[index] += marginals
            squares[index] += marginals**2
            counts[index] += 1
            measured[index[:evaluated]] += 1
            means = sums / counts.clamp_min(1)
            threshold = cfg.discard_threshold * full_backdoor
            # Only contributions measured before the walk's truncation can show a value is small.
            active = [p for p in active if measured[p] < cfg.min_samples or means[p] >= threshold]
        shapley = (sums / counts.clamp_min(1)).float()
        notes = {
            "full_value": round(full_value, 4),
            "full_backdoor": round(full_backdoor, 4),
            "candidates": len(candidates),
            "still_estimated": len(active),
            "walks": len(walk_lengths),
            "evaluations": sum(walk_lengths) + cfg.screen_samples,
            "mean_walk_length": round(sum(walk_lengths) / max(1, len(walk_lengths)), 1),
            "top_shapley": [round(v, 4) for v in shapley.topk(min(10, game.players)).values.tolist()],
        }
        return shapley, notes

    def _screen(self, game: _Game, generator: torch.Generator) -> torch.Tensor:
        """First-order Owen estimate: mean gradient of the value over coalitions that keep each
        player with probability t, t stratified over (0, 1]."""
        cfg: ShapPruningConfig = self.config
        samples = max(1, cfg.screen_samples)
        t = (torch.arange(samples) + torch.rand(samples, generator=generator)) / samples
        coalitions = (torch.rand(samples, game.players, generator=generator) < t[:, None]).float()
        return game.gradients(coalitions).mean(0)

    def _permutation(self, active, sums, squares, counts, generator) -> list[int]:
        """Epsilon-greedy: uniformly random with probability epsilon, else best estimates first (each
        jittered by its standard error, so that greedy walks differ)."""
        cfg: ShapPruningConfig = self.config
        index = torch.as_tensor(active)
        if float(torch.rand((), generator=generator)) < cfg.epsilon:
            return index[torch.randperm(len(index), generator=generator)].tolist()
        n = counts[index].clamp_min(1).double()
        mean = sums[index] / n
        spread = (squares[index] / n - mean**2).clamp_min(0).sqrt() / n.sqrt()
        spread[counts[index] < 2] = float(mean.abs().max())
        noisy = mean + spread * torch.randn(len(index), generator=generator, dtype=torch.float64)
        return index[noisy.argsort(descending=True)].tolist()

    def _walk(
        self, game: _Game, order: list[int], full_value: float, full_backdoor: float
    ) -> tuple[torch.Tensor, int]:
        """Remove ``order``'s players one by one from the full model; each is credited with the
        value it removed. Prefixes are evaluated a batch at a time; once the backdoor term is at most
        ``truncation`` of the full model's, the rest are credited 0."""
        cfg: ShapPruningConfig = self.config
        marginals = torch.zeros(len(order), dtype=torch.float64)
        previous, evaluated = full_value, 0
        for start in range(0, len(order), game.per_forward):
            stop = min(len(order), start + game.per_forward)
            # Row j removes the first start + j + 1 players of the order.
            removed = torch.arange(stop)[None, :] <= torch.arange(start, stop)[:, None]
            coalitions = torch.ones(stop - start, game.players)
            coalitions[:, torch.as_tensor(order[:stop])] = (~removed).float()
            values, backdoor, _ = game.evaluate(coalitions)
            evaluated += len(values)
            marginals[start:stop] = (
                torch.cat([torch.tensor([previous], dtype=torch.float64), values[:-1]]) - values
            )
            previous = float(values[-1])
            gone = (backdoor <= cfg.truncation * full_backdoor).nonzero()
            if len(gone):
                marginals[start + int(gone[0]) + 1 :] = 0.0  # truncation: the rest are credited nothing
                break
        return marginals, evaluated

    # -- the own rule -------------------------------------------------------------------------------
    def _own_rule(self, game: _Game, shapley: torch.Tensor) -> tuple[torch.Tensor, int, dict]:
        """Down the ranking of the neurons whose value passes ``relative_threshold``: prune a neuron
        unless it costs the clean term more than ``clean_drop``; stop at ``stop_effect`` or
        ``max_fraction``. Skipped neurons are protected:
        their score is moved above every other, so the plan of ``own_count`` lowest scores is exactly
        the neurons the rule pruned."""
        cfg: ShapPruningConfig = self.config
        scores = -shapley.clone()
        limit = max(1, int(cfg.max_fraction * game.players))
        keep = torch.ones(1, game.players)
        _, before, clean_before = (float(v[0]) for v in game.evaluate(keep))
        # The reversed trigger is fitted to a few images and keeps an adversarial part that no
        # pruning removes, so its effect alone cannot say when to stop: the Shapley values do.
        floor = max(cfg.relative_threshold * float(shapley.max()), cfg.discard_threshold * before, 1e-12)
        ranking = [p for p in shapley.argsort(descending=True).tolist() if shapley[p] >= floor][: 4 * limit]
        backdoor, pruned, protected, position = before, [], [], 0
        while position < len(ranking) and len(pruned) < limit and backdoor > cfg.stop_effect * before:
            # Row j prunes the plan so far plus the next j + 1 neurons of the ranking: one forward
            # finds how far down the ranking the clean term holds.
            batch = ranking[position : position + min(game.per_forward, limit - len(pruned))]
            trials = keep.repeat(len(batch), 1)
            cumulative = torch.arange(len(batch))[None, :] <= torch.arange(len(batch))[:, None]
            trials[:, torch.as_tensor(batch)] = (~cumulative).float()
            _, backdoors, cleans = game.evaluate(trials)
            broken = (cleans < clean_before - cfg.clean_drop - 1e-9).nonzero()
            first_broken = int(broken[0]) if len(broken) else len(batch)
            done = (backdoors[:first_broken] <= cfg.stop_effect * before).nonzero()
            accepted = int(done[0]) + 1 if len(done) else first_broken
            for player in batch[:accepted]:
                keep[0, player] = 0.0
                pruned.append(player)
            if accepted:
                backdoor = float(backdoors[accepted - 1])
            if not len(done) and first_broken < len(batch):
                protected.append(batch[first_broken])  # this neuron costs the clean answers
                accepted += 1
            position += accepted
        if protected:
            scores[torch.as_tensor(protected)] = float(scores.max()) + 1.0
        notes = {
            "own_rule": {
                "pruned": len(pruned),
                "protected": len(protected),
                "backdoor_before": round(before, 4),
                "backdoor_after": round(backdoor, 4),
                "limit": limit,
                "value_floor": round(floor, 5),
            }
        }
        return scores, len(pruned), notes


def _images_of(data, limit: int, seed: int) -> torch.Tensor:
    """At most ``limit`` images of a Dataset / DataLoader of ``(pixels, label)`` pairs, a seeded draw."""
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset
    if len(data) == 0:
        raise DefenseError(
            "shap was given no images: pass a few clean images, or data=None to synthesise them."
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    samples = [data[int(i)] for i in order]
    return torch.stack([s[0] if isinstance(s, (tuple, list)) else s for s in samples]).float()
