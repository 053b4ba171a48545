"""Installed as ``mixtral_quant.calibration`` (pyproject's package-dir): the recipes, the CI gate's bounds and
the corpora the tool reads at run time. The repository keeps this folder at its top level; the training-only
corpora (sotu, python-docs, django-docs) and the build scripts in corpora/ stay in the checkout."""
