"""The moat demo: agent-like code in a sandbox, then two attacks that stay contained."""

from __future__ import annotations

import os
import secrets
import tempfile

from moat import Sandbox

canary = "host-secret-" + secrets.token_hex(8)
os.environ["DEMO_HOST_SECRET"] = canary
with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, dir="/var/tmp") as f:
    f.write(canary)
host_file = f.name

with Sandbox.create(isolation="container", timeout=60) as sbx:
    print(f"sandbox {sbx.sandbox_id} ({sbx.get_info().tier})")

    ex = sbx.run_code(
        "import pandas as pd\n"
        "df = pd.DataFrame({'city': ['Lyon', 'Oslo', 'Lima'], 'temp_c': [14.2, 3.1, 19.8]})\n"
        "print('mean temperature:', df.temp_c.mean())\n"
        "df.sort_values('temp_c')"
    )
    print("stdout:", "".join(ex.logs.stdout).strip())
    print(ex.text)

    print("\n-- attack 1: read a host file and the host environment")
    ex = sbx.run_code(
        f"import os\ntry:\n    print(open({host_file!r}).read())\n"
        "except OSError as e:\n    print('blocked:', e)\n"
        "print('env has host secret:', any('host-secret' in v for v in os.environ.values()))"
    )
    out = "".join(ex.logs.stdout)
    print(out.strip())
    assert canary not in out

    print("\n-- attack 2: open a socket to the internet")
    ex = sbx.run_code(
        "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 443), timeout=3)\n"
        "    print('connected!')\nexcept OSError as e:\n    print('blocked:', e)"
    )
    print("".join(ex.logs.stdout).strip())

os.unlink(host_file)
print("\nsandbox destroyed; nothing of it remains")
