"""Evaluation the way the field does it: nudity (NudeNet), FID, CLIP score, classification.

Each ``kscu evaluate METRIC --images DIR --output FILE.json`` writes one JSON holding the
numbers and the protocol that made them (versions, model ids, thresholds). Keep results in the
run directory they belong to, ``RUN/eval/{metric}.json``, beside ``RUN/images/``; then
``kscu report RUN_DIR... --output report.html`` finds them (see ``kscu.evaluate.report``).
Heavy imports stay inside the submodules, so ``import kscu.evaluate`` is cheap.
"""
