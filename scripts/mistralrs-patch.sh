#!/usr/bin/env bash
# Prepares the patched mistralrs-core 0.8.1 that profilemate-mistralrs builds against, outside the
# checkout (no copy of mistral.rs is ever committed):
#   1. cargo downloads mistralrs-core 0.8.1 from crates.io (a throwaway manifest, `cargo fetch`);
#   2. its sources are unpacked into ~/.cache/profilemate/mistralrs-core-0.8.1-profilemate/;
#   3. profilemate-mistralrs/patches/mistralrs-core-0.8.1.patch (ours, 34 added lines) is
#      applied: mistral.rs 0.8.1 makes `Pipeline` public but keeps its mixin traits and the types
#      in their signatures private, so no crate outside it can wrap a pipeline; the patch re-exports
#      them (`mistralrs_core::pipeline_ext`) and adds one hook, `Pipeline::scheduled`, that the
#      engine calls after each `schedule` with its duration and the queue lengths;
#   4. profilemate-mistralrs/mistralrs-core-patched (git-ignored) links to that folder, which
#      profilemate-mistralrs/Cargo.toml's [patch.crates-io] names.
# Idempotent: a folder already patched with the same patch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/profilemate"
PATCH=$ROOT/profilemate-mistralrs/patches/mistralrs-core-0.8.1.patch
DEST=$CACHE/mistralrs-core-0.8.1-profilemate
LINK=$ROOT/profilemate-mistralrs/mistralrs-core-patched
STAMP=$(sha256sum "$PATCH" | cut -c1-16)

if [ ! -f "$DEST/.profilemate-patched-$STAMP" ]; then
    CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
    crate=$(ls "$CARGO_HOME"/registry/cache/*/mistralrs-core-0.8.1.crate 2>/dev/null | head -n1 || true)
    if [ -z "$crate" ]; then
        fetch=$(mktemp -d)
        mkdir -p "$fetch/src" && touch "$fetch/src/lib.rs"
        printf '[package]\nname = "fetch-mistralrs-core"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nmistralrs-core = "=0.8.1"\n[workspace]\n' > "$fetch/Cargo.toml"
        (cd "$fetch" && cargo fetch --quiet)
        rm -rf "$fetch"
        crate=$(ls "$CARGO_HOME"/registry/cache/*/mistralrs-core-0.8.1.crate | head -n1)
    fi
    rm -rf "$DEST" "$DEST.tmp"
    mkdir -p "$DEST.tmp"
    tar -xzf "$crate" -C "$DEST.tmp" --strip-components=1
    # git apply, not patch(1): git is on every machine that has the checkout.
    (cd "$DEST.tmp" && git apply "$PATCH")
    touch "$DEST.tmp/.profilemate-patched-$STAMP"
    mv "$DEST.tmp" "$DEST"
    echo "mistralrs-patch: patched mistralrs-core 0.8.1 in $DEST"
fi
ln -sfn "$DEST" "$LINK"
