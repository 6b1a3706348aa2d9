#!/usr/bin/env bash
# Download COCO 2014 images and the Karpathy split into data/coco/ (about 19 GB).
# Rerunning skips what is already there; wget -c resumes interrupted downloads.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p coco && cd coco
for part in train2014 val2014; do
  if [ ! -d "$part" ]; then
    wget -c "http://images.cocodataset.org/zips/$part.zip"
    unzip -q "$part.zip" && rm "$part.zip"
  fi
done
if [ ! -f dataset_coco.json ]; then
  wget -c "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
  unzip -q -o caption_datasets.zip dataset_coco.json && rm caption_datasets.zip
fi
echo "done: $(pwd)"
