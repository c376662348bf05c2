#!/usr/bin/env bash
# Installs the Python tools the tests use (the API contract test: schemathesis and
# openapi-spec-validator; the Kubernetes manifests' test: kubernetes-validate; all pinned)
# into a virtualenv outside the checkout and prints its bin directory. Idempotent: an
# existing virtualenv with the pinned versions is reused.
set -euo pipefail
exec 3>&1 1>&2
venv=${PYLON_VENV:-/var/tmp/pylon-venv}
pins=(schemathesis==4.32.5 openapi-spec-validator==0.9.0 kubernetes-validate==1.37.0)
have() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "${pins[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
}
if ! have; then
  echo "Installing ${pins[*]} into $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    ${SUDO:-} apt-get update -q && DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -q python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
  have || { echo "the Python tools did not install: ${pins[*]}"; exit 1; }
fi
echo "$venv/bin" >&3
