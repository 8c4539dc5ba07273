"""The Kaggle kit: what a code competition's offline notebook needs to score the trained models.

`pipeline package` writes three folders: models/ (a dataset: every member's folds, backbone files and
config, a MANIFEST.json of sha256 hashes), wheels/ (a dataset: the project's wheel and each dependency
Kaggle's image lacks) and kernel/ (the inference script and its kernel-metadata.json). On Kaggle the
script installs the wheels with no index, finds the kit under /kaggle/input, checks its hashes and writes
submission.csv through the same checks as `pipeline submit`. `pipeline rehearse` runs it here the way
Kaggle would: a fresh environment holding only the image's packages, no network, no pip configuration.
"""
