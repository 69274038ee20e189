"""Case 10: what ``make run`` exposes.

* Every listening socket of the stack's processes (the launcher and everything below it:
  ``airflow standalone``, its components, the LocalExecutor workers, the demo API) is bound
  to 127.0.0.1, as the kernel reports it (through psutil).
* The admin password is in its 0600 file only: never in what ``make run`` printed (every
  start of this session, restarts included) and in no git-tracked file; ``make run``'s
  AIRFLOW_HOME (``.airflow/``) is git-ignored.
"""

from __future__ import annotations

import subprocess

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.reliability


def test_every_listener_of_the_stack_is_on_localhost(stack):
    listeners = stack.listeners()
    print("\n[case 10] listeners of the stack:\n" + "\n".join(f"  {l.proto} {l.address} pid {l.pid} {l.process}" for l in listeners))
    ports = {int(l.address.rpartition(":")[2]) for l in listeners if l.proto == "tcp"}
    assert {stack.port, stack.demo_port} <= ports, "the API server and the demo API should be among them"
    exposed = [l for l in listeners if l.address.rpartition(":")[0] not in ("127.0.0.1", "[::1]")]
    assert not exposed, f"listening beyond localhost: {exposed}"


def test_the_admin_password_is_never_printed_nor_committed(stack):
    password = stack.password()
    password_file = stack.home / "simple_auth_manager_passwords.json.generated"
    assert password_file.stat().st_mode & 0o077 == 0, "the password file is readable by others"
    output = stack.log_text()
    assert stack.starts >= 1 and "[run] the admin password is stored in" in output
    assert password not in output, "make run printed the admin password"

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    needle = password.encode()
    leaked = [
        name for name in tracked.decode().split("\0")
        if name and (REPO_ROOT / name).is_file() and needle in (REPO_ROOT / name).read_bytes()
    ]
    assert not leaked, f"the admin password is in tracked files: {leaked}"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".airflow/simple_auth_manager_passwords.json.generated"], cwd=REPO_ROOT
    )
    assert ignored.returncode == 0, ".airflow/ (make run's AIRFLOW_HOME, with the password file) must be git-ignored"
