"""Evaluation the way the field does it: nudity (NudeNet), FID, CLIP score, classification.

Each ``kscu evaluate METRIC --images DIR --output FILE.json`` writes one JSON holding the
numbers and the protocol that made them (versions, model ids, thresholds). Keep results in the
run directory they belong to, ``RUN/eval/{metric}.json``, beside ``RUN/images/``; then
``kscu report RUN_DIR... --output report.html`` finds them (see ``kscu.evaluate.report``).
Per-image results are cached by file content beside the images (``IMAGES/.kscu-cache``, see
``kscu.evaluate.cache``): a rerun computes only new images, and each JSON says how many it
computed (``computed_images``) and took from the cache (``cached_images``).
Heavy imports stay inside the submodules, so ``import kscu.evaluate`` is cheap.
"""
