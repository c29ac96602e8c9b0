#!/usr/bin/env bash
# Renders DIR/report.html (written by scripts/main-job.sh) in headless Chromium and fails if the
# page logs a console error or an uncaught exception, or fails to load something; then takes a
# full-page screenshot and checks that it is not blank and that every figure of the page shows
# (each figure's area of the screenshot holds many colours, not a blank box).
#
#   bash scripts/check-html.sh DIR
#
# Chromium comes from Debian (/usr/bin/chromium, installed with apt-get when missing; CI runs this
# as root). Headless Chromium's log does not say a console message's level, so the page is loaded
# a first time with a small script put in front of everything else: it records console.error
# calls, uncaught exceptions, unhandled rejections and failed loads, and, once the page has
# loaded, writes what it recorded, the page's height and where each figure sits into the DOM,
# which --dump-dom prints. Before that, a canary page with a deliberate console.error and a
# broken script must be caught, or the check itself is broken. The screenshot is taken of the
# page as written, in a window as tall as the page; its path is printed at the end.
# CHECK_HTML_OUT=DIR keeps the screenshot there (default: a new temporary directory).
set -euo pipefail

dir="${1:-}"
if [ -z "$dir" ] || [ ! -f "$dir/report.html" ]; then
  echo "usage: scripts/check-html.sh DIR (a run directory holding report.html, as scripts/main-job.sh writes it)" >&2
  exit 2
fi
dir="$(cd "$dir" && pwd)"
page="$dir/report.html"

chromium=/usr/bin/chromium
if [ ! -x "$chromium" ]; then
  echo "== installing chromium"
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/check-html.sh: $chromium is missing and installing it needs root (apt-get install -y chromium)" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi
command -v python3 >/dev/null || { echo "scripts/check-html.sh: python3 is required" >&2; exit 1; }

work="$(mktemp -d)"
out="${CHECK_HTML_OUT:-$(mktemp -d)}"
mkdir -p "$out"
probe=""
cleanup() {
  rm -rf "$work"
  [ -n "$probe" ] && rm -f "$probe"
  return 0
}
trap cleanup EXIT

# chromium FLAGS... URL: headless, isolated, no network chatter, bounded in time.
run_chromium() {
  local profile
  profile="$(mktemp -d "$work/profile.XXXXXX")"
  timeout 180 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --enable-logging=stderr --v=0 --hide-scrollbars "$@"
}

# The recorder, inserted before anything else of the page.
cat >"$work/recorder.html" <<'HTML'
<script>
(function () {
  var errors = [];
  function text(args) {
    return Array.prototype.map.call(args, function (a) {
      try { return a instanceof Error ? a.stack || String(a) : typeof a === "object" ? JSON.stringify(a) : String(a); }
      catch (e) { return String(a); }
    }).join(" ");
  }
  var consoleError = console.error;
  console.error = function () { errors.push("console.error: " + text(arguments)); return consoleError.apply(console, arguments); };
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && t.nodeType === 1) {
      errors.push("failed to load <" + t.tagName.toLowerCase() + "> " + (t.src || t.href || t.data || ""));
    } else {
      errors.push("uncaught: " + e.message + " (" + (e.filename || "?") + ":" + (e.lineno || "?") + ")");
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    errors.push("unhandled rejection: " + (e.reason && (e.reason.stack || e.reason.message) || e.reason));
  });
  document.addEventListener("securitypolicyviolation", function (e) {
    errors.push("blocked by content security policy: " + e.blockedURI);
  });
  window.addEventListener("load", function () {
    setTimeout(function () {
      var d = document.documentElement;
      var figures = Array.prototype.map.call(document.querySelectorAll(".fig"), function (f) {
        var r = f.getBoundingClientRect();
        return { id: f.id, x: Math.round(r.left + window.scrollX), y: Math.round(r.top + window.scrollY),
                 w: Math.round(r.width), h: Math.round(r.height) };
      });
      var result = { errors: errors, height: Math.max(d.scrollHeight, document.body ? document.body.scrollHeight : 0),
                     width: d.scrollWidth, figures: figures };
      d.setAttribute("data-check-html", encodeURIComponent(JSON.stringify(result)));
    }, 50);
  });
})();
</script>
HTML

# probe PAGE: loads an instrumented copy of PAGE (beside it, so relative references resolve as
# they do for the page itself) and writes what the recorder found to $work/probe.json.
probe_page() {
  local src="$1" name
  name="$(dirname "$src")/.check-html-$$-$(basename "$src")"
  probe="$name"
  python3 - "$src" "$work/recorder.html" "$name" <<'PY'
import re, sys
src, recorder, dst = sys.argv[1:4]
page = open(src, encoding="utf-8").read()
script = open(recorder, encoding="utf-8").read()
# Right after <head ...> (or <html ...>, or at the very start): before any script of the page.
m = re.search(r"<head\b[^>]*>", page, re.I) or re.search(r"<html\b[^>]*>", page, re.I)
at = m.end() if m else 0
open(dst, "w", encoding="utf-8").write(page[:at] + script + page[at:])
PY
  run_chromium --window-size=1400,5000 --virtual-time-budget=10000 --dump-dom "file://$name" \
    >"$work/dom.html" 2>"$work/probe.log" || {
    echo "scripts/check-html.sh: chromium failed on $src:" >&2
    tail -20 "$work/probe.log" >&2
    return 1
  }
  rm -f "$name"
  probe=""
  python3 - "$work/dom.html" "$work/probe.log" "$work/probe.json" <<'PY'
import json, re, sys, urllib.parse
dom, log, dst = sys.argv[1:4]
m = re.search(r'data-check-html="([^"]*)"', open(dom, encoding="utf-8", errors="replace").read())
if not m:
    sys.exit("scripts/check-html.sh: the recorder did not report (the page never finished loading?)")
result = json.loads(urllib.parse.unquote(m.group(1)))
# Chromium also logs every console message to stderr, without its level: what only the browser
# reports there (an uncaught error in a script that ran before the recorder, a refused load)
# counts as an error too.
for line in open(log, encoding="utf-8", errors="replace"):
    c = re.search(r':CONSOLE[:(]\d+\)?\] "(.*)", source: ', line)
    if c and re.match(r"(Uncaught|Failed to load resource|Refused to|Not allowed to load)", c.group(1)):
        message = "browser: " + c.group(1)
        if not any(c.group(1) in e for e in result["errors"]):
            result["errors"].append(message)
json.dump(result, open(dst, "w"))
PY
}

errors_of() {
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(len(r["errors"])); [print("   ", e) for e in r["errors"]]' "$work/probe.json"
}

echo "== canary: a page with a deliberate console.error and a broken script must fail the check"
mkdir -p "$work/canary"
cat >"$work/canary/report.html" <<'HTML'
<!DOCTYPE html><html><head><meta charset="utf-8"><title>canary</title></head><body><p>canary</p>
<script>console.log("not an error"); console.error("deliberate console.error");</script>
<script>thisFunctionDoesNotExist();</script>
</body></html>
HTML
probe_page "$work/canary/report.html"
canary="$(errors_of)"
if [ "$(head -1 <<<"$canary")" -ne 2 ]; then
  echo "scripts/check-html.sh: the console check missed the canary's errors (expected 2, got):" >&2
  echo "$canary" >&2
  exit 1
fi
echo "   caught both:"
tail -n +2 <<<"$canary"

echo "== console of $page"
probe_page "$page"
found="$(errors_of)"
if [ "$(head -1 <<<"$found")" -ne 0 ]; then
  echo "scripts/check-html.sh: $page logged $(head -1 <<<"$found") console error(s):" >&2
  tail -n +2 <<<"$found" >&2
  exit 1
fi
height="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["height"])' "$work/probe.json")"
echo "   no console errors; page is ${height} px tall"

# The whole page in one shot: a window at least 5000 px tall, and as tall as the page.
shot_height=$((height > 5000 ? height : 5000))
[ "$shot_height" -gt 16000 ] && shot_height=16000
screenshot="$out/report-screenshot.png"
rm -f "$screenshot"
run_chromium --window-size="1400,$shot_height" --virtual-time-budget=10000 --screenshot="$screenshot" \
  "file://$page" >"$work/shot.out" 2>"$work/shot.log" || {
  echo "scripts/check-html.sh: chromium could not take the screenshot:" >&2
  tail -20 "$work/shot.log" >&2
  exit 1
}
[ -s "$screenshot" ] || { echo "scripts/check-html.sh: no screenshot written" >&2; exit 1; }

echo "== screenshot: not blank, and every figure shows"
python3 - "$screenshot" "$work/probe.json" <<'PY'
import json, struct, sys, zlib

path, probe = sys.argv[1:3]


def read_png(path):
    """(width, height, rows of (r, g, b) tuples) of an 8-bit, non-interlaced PNG."""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        sys.exit(f"{path}: not a PNG")
    pos, idat, palette = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = [tuple(body[i : i + 3]) for i in range(0, len(body), 3)]
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if depth != 8 or interlace != 0 or colour not in (0, 2, 3, 4, 6):
        sys.exit(f"{path}: unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace})")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    rows, prev, i = [], bytearray(stride), 0
    for _ in range(height):
        filt, line = raw[i], bytearray(raw[i + 1 : i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if filt == 1:
                line[x] = (line[x] + a) & 0xFF
            elif filt == 2:
                line[x] = (line[x] + b) & 0xFF
            elif filt == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        prev = line
        if colour == 2:
            rows.append([tuple(line[x : x + 3]) for x in range(0, stride, 3)])
        elif colour == 6:
            rows.append([tuple(line[x : x + 3]) for x in range(0, stride, 4)])
        elif colour == 3:
            rows.append([palette[v] for v in line])
        else:
            rows.append([(v, v, v) for v in line[::channels]])
    return width, height, rows


width, height, rows = read_png(path)
result = json.load(open(probe))
print(f"   {path}: {width} x {height} px")

all_colours = set()
non_white = 0
for row in rows[::2]:
    for p in row[::2]:
        all_colours.add(p)
        non_white += p != (255, 255, 255)
sampled = ((height + 1) // 2) * ((width + 1) // 2)
print(f"   whole page: {len(all_colours)} colours, {non_white / sampled * 100:.1f}% not white")
failures = []
if len(all_colours) < 50 or non_white / sampled < 0.02:
    failures.append("the screenshot is (nearly) blank")

figures = result["figures"]
if not figures:
    failures.append("the page has no figure (no .fig element)")
for f in figures:
    x0, y0 = max(f["x"], 0), max(f["y"], 0)
    x1, y1 = min(f["x"] + f["w"], width), min(f["y"] + f["h"], height)
    if x1 - x0 < 100 or y1 - y0 < 100:
        failures.append(f"figure {f['id']}: outside the screenshot ({f})")
        continue
    colours, inked, n = set(), 0, 0
    for row in rows[y0:y1:2]:
        for p in row[x0:x1:2]:
            colours.add(p)
            n += 1
            inked += p != (255, 255, 255)
    # Plot lines, bars, markers and antialiased text give hundreds of colours; an empty or
    # missing figure gives one or a handful.
    ok = len(colours) >= 40 and inked / n >= 0.03
    print(f"   {'ok  ' if ok else 'FAIL'} {f['id']:<28} at y={f['y']:>5}, {f['w']}x{f['h']}: "
          f"{len(colours):>4} colours, {inked / n * 100:4.1f}% inked")
    if not ok:
        failures.append(f"figure {f['id']} looks blank ({len(colours)} colours)")
if failures:
    for msg in failures:
        print(f"scripts/check-html.sh: {msg}", file=sys.stderr)
    sys.exit(1)
print(f"   all {len(figures)} figures show")
PY

echo "screenshot: $screenshot"
