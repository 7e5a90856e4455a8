#!/usr/bin/env bash
# Fill the git-ignored folder .gpu/ with what benchmarks/gpu_check.sh needs on a GPU machine that has torch but no
# package index: timm as source (the version requirements.txt pins; the machine's own may be another), timm 0.3.2
# and 0.5.4 (the versions the official MAE and MixMIM code were written for) and the two official checkouts.
#
#   bash benchmarks/gpu_prepare.sh MAE_REPO MIXMIM_REPO
#
# MAE_REPO / MIXMIM_REPO: a checkout or a git directory of facebookresearch/mae and Sense-X/MixMIM (HEAD is
# exported). Without them only timm is prepared and gpu_check.sh skips the official rows. Nothing here is
# committed: .gpu/ is in .gitignore, and the official code stays outside the repository's history.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu
PIP=${PIP:-.venv/bin/pip}
TIMM=$(sed -n 's/^timm==\(.*\)$/\1/p' requirements.txt)
[ -n "$TIMM" ] || { echo "error: requirements.txt pins no timm==X" >&2; exit 1; }

rm -rf "$DEST" && mkdir -p "$DEST/wheels"
for version in "$TIMM" 0.3.2 0.5.4; do
  "$PIP" download -q --disable-pip-version-check --no-deps "timm==$version" -d "$DEST/wheels" 2>/dev/null \
    || { echo "error: could not download timm==$version" >&2; exit 1; }
done
unzip_timm() {  # a wheel is a zip of the package's source: unpack only the package itself
  mkdir -p "$2" && python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
[z.extract(n, sys.argv[2]) for n in z.namelist() if n.startswith('timm/')]" "$1" "$2"
}
unzip_timm "$DEST/wheels/timm-$TIMM-py3-none-any.whl" "$DEST/timm"
unzip_timm "$DEST/wheels/timm-0.3.2-py3-none-any.whl" "$DEST/timm032"
unzip_timm "$DEST/wheels/timm-0.5.4-py3-none-any.whl" "$DEST/timm054"
rm -rf "$DEST/wheels"

export_repo() {  # HEAD of a checkout or git directory -> a plain folder
  local src=$1 dst=$2
  mkdir -p "$dst"
  git --git-dir="$(git -C "$src" rev-parse --absolute-git-dir 2>/dev/null || echo "$src")" archive HEAD | tar -x -C "$dst"
  git --git-dir="$(git -C "$src" rev-parse --absolute-git-dir 2>/dev/null || echo "$src")" rev-parse HEAD >"$dst/COMMIT"
}
if [ $# -ge 2 ]; then
  export_repo "$1" "$DEST/official/mae"
  export_repo "$2" "$DEST/official/mixmim"
  rm -rf "$DEST/official/mae/demo" "$DEST/official/mixmim/figures"  # notebooks and images: not needed, large
fi
du -sh "$DEST"
echo "prepared $DEST (timm $TIMM, 0.3.2, 0.5.4$([ $# -ge 2 ] && echo ', the official MAE and MixMIM'))"
