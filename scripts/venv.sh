# Sourced by test.sh and bench.sh: create .venv (once), install paddler editable
# with the extras given, and build the Cython extensions next to their sources.
# llama-cpp-python compiles from source when no wheel fits (about 9 minutes);
# pip keeps the built wheel in its cache, so later installs take seconds.
setup_venv() {
    local extras="$1"
    PYTHON=${PYTHON:-python3}
    VENV=${PADDLER_VENV:-.venv}
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
    # cython is a build tool, not a run-time dependency: the in-place build needs it here
    "$VENV/bin/python" -m pip install --quiet "cython>=3.0"
    "$VENV/bin/python" setup.py --quiet build_ext --inplace
}
