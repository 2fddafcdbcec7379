"""``kscu attack``: is the concept really gone? Adversarial prompts against erased weights.

Two attacks of the field, each as its reference code runs it (``kscu.protocol`` states the
defaults and where they come from):

- ``unlearndiff`` (UnlearnDiffAtk, Zhang et al., ECCV 2024): white-box; K token slots prepended
  to the prompt, optimised so that the erased model denoises the original model's image of the
  prompt well (``kscu.attack.unlearndiff``);
- ``ringabell`` (Ring-A-Bell, Tsai et al., ICLR 2024): model-agnostic; a concept vector in the
  text encoder's space, added to the prompt's conditioning, searched back to words with a
  genetic algorithm (``kscu.attack.ringabell``).

The judges (``kscu.attack.judges``) are the project's evaluators; ``kscu.attack.run`` runs an
attack over prompts with resumable per-prompt records and writes ``attack.json``.
"""
