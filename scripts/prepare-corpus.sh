#!/usr/bin/env bash
# Build the training corpus of the bundled models from Debian's package archive:
# the fortune-cookie databases (fortunes, fortunes-min) and the King James Bible
# (bible-kjv, bible-kjv-text). Writes OUT/fortunes.txt and OUT/kjv.txt.
#
# Usage: scripts/prepare-corpus.sh OUT
set -euo pipefail

out=${1:?usage: scripts/prepare-corpus.sh OUT}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
apt-get download fortunes fortunes-min bible-kjv bible-kjv-text >/dev/null
for deb in *.deb; do dpkg -x "$deb" root; done
cd - >/dev/null

# Fortunes: one entry per paragraph. Entries in the databases end with a line
# holding only "%"; overstrike sequences ("X<BS>Y") keep only the last char.
# ascii-art is pictures, not prose, so it is left out.
python3 - "$work/root/usr/share/games/fortunes" "$out/fortunes.txt" <<'PY'
import pathlib, re, sys

source, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
entries = []
for path in sorted(source.iterdir()):
    if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name == "ascii-art":
        continue
    text = path.read_bytes().decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)
    for entry in text.split("\n%\n"):
        entry = entry.strip("\n%").rstrip()
        if entry:
            entries.append(entry)
target.write_text("\n\n".join(entries) + "\n", encoding="utf-8")
print(f"{target}: {len(entries)} entries, {target.stat().st_size} bytes")
PY

# King James Bible: one verse per line, without the "Ge1:1 " references.
"$work/root/usr/bin/bible" -f -p "$work/root/usr/lib" Gen1:1-Rev22:21 \
  | sed -E 's/^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ //' >"$out/kjv.txt"
echo "$out/kjv.txt: $(wc -l <"$out/kjv.txt") verses, $(stat -c %s "$out/kjv.txt") bytes"
