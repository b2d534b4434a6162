"""``python -m onnxlr``: exit code 130 on an interrupt at any point, start-up imports included."""
import os
import sys

try:
    from onnxlr.cli import main
    code = main()
except KeyboardInterrupt:
    print("onnxlr: interrupted; nothing was written", file=sys.stderr)
    code = 130
if code == 130:
    # CPython may turn an interrupt that landed inside an extension's import into exit -2;
    # leave with the documented code instead
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
sys.exit(code)
