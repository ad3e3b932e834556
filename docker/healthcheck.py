"""Container health check: exit 0 when the service's ``GET /ready`` answers 200, else 1.

Standard library only (the image has no curl). ``/ready`` answers 503 until the base model is
loaded; urllib raises on any status >= 400 and on connection errors.
"""

import os
import sys
import urllib.request


def main() -> int:
    """Probe ``/ready`` on the port the service listens on (``NLI_PORT``, default 8000)."""
    url = f"http://127.0.0.1:{os.environ.get('NLI_PORT', '8000')}/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        sys.stderr.write(f"{url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
