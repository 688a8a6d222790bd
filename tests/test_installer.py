"""The Windows installer, examples/windows/install-obuilder-reconcile.ps1: it cannot run here, so its
structure is checked against the Python side (flags, policy fields, the ctr identity check), every
rule the reviews asked for is checked present, and the script is parsed with tree-sitter's PowerShell
grammar (tools/ps_parse.py, as `make lint` runs it)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import build_check_policy_parser, build_service_parser
from controller.model.policy import ContainerdSpec, ReconcilePolicySpec, StoreSpec, WorkerSpec

REPO = Path(__file__).parent.parent
INSTALLER = REPO / "examples" / "windows" / "install-obuilder-reconcile.ps1"
EXAMPLE_POLICY = REPO / "examples" / "windows-hcs-worker.yaml"
PS_PARSE = REPO / "tools" / "ps_parse.py"
#: PowerShell's automatic variables the script may use without defining them.
AUTOMATIC = {"_", "true", "false", "null", "LASTEXITCODE", "ErrorActionPreference", "Matches"}


def _ps_code(text: str) -> str:
    """The script without its comments (the help block and # lines), where names are prose."""
    text = re.sub(r"<#.*?#>", "", text, flags=re.S)
    return "\n".join(line.split(" # ")[0] if not line.lstrip().startswith("#") else "" for line in text.splitlines())


def _block(code: str, start: str, end: str = "\n}\n") -> str:
    """The text from ``start`` to the first ``end`` after it (a function's body, an if's branch)."""
    at = code.index(start)
    return code[at : code.index(end, at)]


@pytest.fixture(scope="module")
def code() -> str:
    return _ps_code(INSTALLER.read_text())


@pytest.fixture(scope="module")
def uninstall(code: str) -> str:
    return _block(code, "if ($Uninstall) {", "\n    return\n}\n")


def test_the_installer_uses_only_variables_it_defines(code: str) -> None:
    # Set-StrictMode makes an undefined variable a failure on Windows; here it is caught on Linux.
    params = set(re.findall(r"\[(?:string|switch)\]\s*\$(\w+)", code.split(")\nSet-StrictMode")[0]))
    assert {"Python", "Policy", "Uninstall", "ServiceName", "StateDir", "WorkerExe", "ContainerdService"} <= params
    assigned = set(re.findall(r"\$(\w+)\s*=[^=]", code))
    loops = set(re.findall(r"foreach\s*\(\$(\w+)\s+in", code))
    function_params = {
        v for sig in re.findall(r"function [\w-]+\(([^)]*)\)", code) for v in re.findall(r"\$(\w+)", sig)
    }
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", code)) - {"env"}
    undefined = used - params - assigned - loops - function_params - AUTOMATIC
    assert not undefined, f"used but never defined: {sorted(undefined)}"


def test_the_installer_calls_only_flags_and_subcommands_the_python_side_has(code: str) -> None:
    bin_path = re.search(r"\$binPath = (.*?)\n\n", code, re.S)
    assert bin_path is not None
    service = bin_path.group(1)
    # The service runs isolated, as every probe of the installer does.
    assert '`"$Python`" -I -m controller service ' in service
    known = build_service_parser()._option_string_actions
    flags = re.findall(r"(--[\w-]+)", service)
    assert flags and all(f in known for f in flags), [f for f in flags if f not in known]
    assert "Invoke-Python @('-m', 'controller', 'check-policy', $Policy)" in code, "the policy is not checked"
    # Windows PowerShell 5.1 throws on a native program's redirected stderr under 'Stop': native
    # programs are run in one place, which takes their output as text.
    native = _block(code, "function Invoke-Native")
    assert code.count("2>&1") == native.count("2>&1") == 1 and "$ErrorActionPreference = 'Continue'" in native
    assert not re.search(r"^\s*& \$", code.replace(native, ""), re.M), "a program run outside Invoke-Native"
    assert not re.search(r"\b(?:Start-Process|cmd(?:\.exe)?\s+/c)\b", code), "a program run outside Invoke-Native"
    # What the issue found broken in the old script must not come back.
    assert "--dry-run" not in code and "*>>" not in code and "RestartCount" not in code
    assert "Register-ScheduledTask" not in code
    # Recovery actions that apply to our failures (a stop with a non-zero code), not only crashes.
    assert re.search(r"'failure', \$ServiceName, .*'restart/", code) and "'failureflag', $ServiceName, '1'" in code
    # The worker is found by its executable, and depends on us.
    assert "Win32_Service" in code and "PathName" in code and "-DependsOn $ContainerdService" in code


def test_every_python_probe_runs_isolated_from_the_system_folder_as_the_service_will(code: str) -> None:
    # One helper runs python.exe, with -I (no user site-packages, no PYTHON* variables, no current
    # folder on sys.path), through Invoke-Native, which runs every program from the system folder.
    python = _block(code, "function Invoke-Python")
    assert "Invoke-Native $Python (@('-I') + $Arguments)" in python
    assert "$SystemDir = Join-Path $env:SystemRoot 'System32'" in code
    native = _block(code, "function Invoke-Native")
    push = native.index("Push-Location -LiteralPath $SystemDir")
    assert push < native.index("& $Exe @Arguments") < native.index("Pop-Location")
    assert "finally" in native, "the folder is not restored when the program fails"
    # No python.exe run other than through Invoke-Python; the first probe imports what the service imports.
    assert not re.findall(r"Invoke-Native \$Python\b", code.replace(python, ""))
    probe = re.search(r"\$probe = Invoke-Python @\('-c', '([^']*)'\)", code)
    assert probe is not None
    assert {"sys", "win32serviceutil", "servicemanager", "controller"} <= set(re.findall(r"\b(\w+)\b", probe.group(1)))
    assert "sys.prefix == sys.base_prefix" in probe.group(1)


def test_the_installer_refuses_a_policy_that_would_not_recognise_the_worker(code: str) -> None:
    # It reads the effective policy through the one python helper, with a flag check-policy has.
    calls = re.findall(r"\$(\w+) = Invoke-Python @\('-m', 'controller', 'check-policy', ([^)]*)\)\n", code)
    known = build_check_policy_parser()._option_string_actions
    ((effective, _),) = [(var, args) for var, args in calls if "--json" in args]
    assert all(f in known for _, args in calls for f in re.findall(r"'(--[\w-]+)'", args))
    assert f"${effective}.Code -ne 0" in code, "a failed check-policy --json is not caught"
    assert f"$spec = (${effective}.Output | ConvertFrom-Json).spec" in code and "$workerSpec = $spec.worker" in code
    # The fields it reads are the policy's, as check-policy --json spells them.
    fields = WorkerSpec().model_dump(mode="json", by_alias=True)
    assert {"processNames", "serviceName"} <= set(fields) and ".processNames" in code and ".serviceName" in code
    # The worker's executable as the process listing names it: file name, no .exe, lower case.
    assert "GetFileNameWithoutExtension((Get-ExecutablePath $worker.PathName)).ToLowerInvariant()" in code
    assert "$processNames -notcontains $workerName" in code
    # Each refusal says what to change, and comes before anything is changed.
    refusal = _block(code, "$processNames -notcontains $workerName", "\n}")
    assert "throw" in refusal and "Add '$workerName' to" in refusal and "spec.worker.processNames in $Policy" in refusal
    mismatch = _block(code, "$workerSpec.serviceName -ne $worker.Name", "\n}")
    assert "throw" in mismatch and "set spec.worker.serviceName: $($worker.Name) in $Policy" in mismatch
    unset = code[code.index("if (-not $workerSpec.serviceName)") :]
    assert "set spec.worker.serviceName: $($worker.Name)" in unset[: unset.index("} elseif")]
    assert code.index("$processNames -notcontains") < code.index("$workerSpec.serviceName -ne") < _first_change(code)


def _first_change(code: str) -> int:
    """Where the install starts changing the machine (StateDir's ACL and log aside)."""
    install = code.index("$binPath = ")
    changes = (
        "New-Service",
        "Invoke-CimMethod",
        "Set-Dependencies $worker",
        "Invoke-Sc @(",
        "Remove-Item",
        "Set-Service",
    )
    return min(code.index(change, install) for change in changes if change in code[install:])


def test_the_installer_refuses_a_store_root_that_is_not_the_workers(code: str) -> None:
    fields = ReconcilePolicySpec().model_dump(mode="json", by_alias=True)
    assert "root" in StoreSpec().model_dump(mode="json", by_alias=True) and "store" in fields
    # The worker's ROOT, from --store=hcs:ROOT in its service's command line, quoted or not.
    store_root = _block(code, "function Get-StoreRoot")
    assert "--store" in store_root and "hcs:" in store_root
    assert "$workerStore = Get-StoreRoot $worker.PathName" in code
    # Compared as full paths (case and a trailing backslash aside); each refusal names both and the fix.
    compare = _block(code, "if ((Get-NormalPath $spec.store.root) -ne (Get-NormalPath $workerStore))", "\n}")
    assert "throw" in compare and "$($spec.store.root)" in compare and "--store=hcs:${workerStore}" in compare
    assert "set spec.store.root: '$workerStore' in $Policy" in compare
    for start in ("if (-not $workerStore)", "if (-not $spec.store.root)"):
        assert "throw" in _block(code, start, "\n}")
    assert code.index("Get-NormalPath $spec.store.root") < _first_change(code)


def test_the_installer_runs_the_policys_ctr_as_the_service_would_and_refuses_what_is_not_ctr(code: str) -> None:
    assert "ctr" in ContainerdSpec().model_dump(mode="json", by_alias=True)
    assert "if ($spec.containerd.ctr) { $ctr = $spec.containerd.ctr }" in code
    # A full path as is; a bare name through the MACHINE Path of the registry, never $env:PATH.
    resolve = _block(code, "function Resolve-Ctr")
    assert "IsPathRooted($Ctr)) { return $Ctr }" in resolve
    assert "Get-RegistryList $MachineEnvironment 'Path'" in resolve
    assert "$MachineEnvironment = 'HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Environment'" in code
    assert not re.search(r"\$env:PATH", code, re.I), "the admin session's PATH is not the service's"
    # ctr --version, judged as controller/adapters/ctr.py judges it.
    assert "$ctrRun = Invoke-Native $ctrPath @('--version')" in code
    from controller.adapters import ctr

    pattern = re.search(r"\$CtrVersion = '([^']*)'", code)
    assert pattern is not None and pattern.group(1) == ctr._CTR_VERSION.pattern.replace("(?:", "(")
    refusal = _block(code, "if ($ctrRun.Code -ne 0 -or $ctrSaid -notmatch $CtrVersion)", "\n}")
    assert "throw" in refusal and "$ctrFix" in refusal
    assert "C:\\Program Files\\containerd\\ctr.exe" in code[code.index("$ctrFix = ") :]
    assert code.index("$ctrRun = Invoke-Native") < _first_change(code)


def test_the_example_policy_puts_ctr_where_containerds_windows_instructions_do() -> None:
    text = EXAMPLE_POLICY.read_text()
    assert "ctr: 'C:\\Program Files\\containerd\\ctr.exe'" in text
    assert "containerd\\bin\\ctr.exe" not in text


def test_the_workers_dependencies_keep_its_groups_and_gain_only_our_name(code: str, uninstall: str) -> None:
    # Both lists are read from the registry, and sc.exe is given the groups back (+GROUP).
    deps = _block(code, "function Get-Dependencies")
    assert "HKLM:\\SYSTEM\\CurrentControlSet\\Services\\$Name" in deps
    assert "'DependOnService'" in deps and "'DependOnGroup'" in deps
    set_deps = _block(code, "function Set-Dependencies")
    assert '"+$_"' in set_deps and "'depend='" in set_deps and "read back" in set_deps
    install = code[code.index("$binPath = ") :]
    assert "Set-Dependencies $worker.Name (@($workerDeps.Services) + $ServiceName) @($workerDeps.Groups)" in install
    # The uninstall takes our name out of each service's current list, and trusts no saved file.
    assert "@($deps.Services | Where-Object { $_ -ne $ServiceName }) @($deps.Groups)" in uninstall
    assert "Get-Content" not in code.replace(_block(code, "function Get-StatusReason"), ""), "a saved file is read"
    assert "ConvertFrom-Json" not in uninstall


def test_the_state_dir_is_system_and_administrators_only(code: str, uninstall: str) -> None:
    protect = _block(code, "function Protect-StateDir")
    assert "SetAccessRuleProtection($true, $false)" in protect, "inherited permissions are kept"
    assert "$LocalSystemSid = 'S-1-5-18'" in code and "$AdministratorsSid = 'S-1-5-32-544'" in code
    granted = re.findall(r"foreach \(\$sid in @\(([^)]*)\)\)", protect)
    assert granted == ["$LocalSystemSid, $AdministratorsSid"]
    assert "'FullControl'" in protect and "Set-Acl -LiteralPath $StateDir" in protect and "throw" in protect
    # Before anything is read from or written under it.
    assert uninstall.lstrip().startswith("if ($Uninstall) {\n    Protect-StateDir")
    install = code[code.index("foreach ($path in @($Python, $Policy))") :]
    assert install.index("Protect-StateDir") < install.index("Invoke-Python")


def test_the_install_waits_for_the_service_to_run_or_stop_and_says_how_it_ended(code: str) -> None:
    wait = _block(code, "function Wait-ServiceState")
    assert "while ($true)" in wait and "$deadline" in wait and "Start-Sleep" in wait
    assert re.search(r"\$StartWaitSeconds = \d+", code)
    after = code[code.index("Invoke-Sc @('start', $ServiceName)") :]
    assert after.index("Wait-ServiceState $ServiceName @('Running', 'Stopped') $StartWaitSeconds") < 400
    for said in ("$final.ExitCode", "$final.ServiceSpecificExitCode", "1066", "Get-StatusReason $statusPath"):
        assert said in after
    assert "$statusPath = Join-Path $spec.store.root 'state\\obuilder-reconcile\\status.json'" in code
    stopped = _block(after, "elseif ($final.State -eq 'Stopped')", "\n    }")
    assert "throw" in stopped and "exit code $code" in stopped


def test_the_uninstall_stops_and_waits_then_restores_then_deletes_and_never_throws_halfway(uninstall: str) -> None:
    stop = uninstall.index("@('stop', $ServiceName)")
    waited = uninstall.index("Wait-ServiceState $ServiceName @('Stopped') $StopWaitSeconds")
    restore = uninstall.index("Set-Dependencies $other.Name")
    delete = uninstall.index("Invoke-Sc @('delete', $ServiceName)")
    assert stop < waited < restore < delete
    assert "Stop-Service" not in uninstall.replace("(Stop-Service $(", "")  # sc.exe, whose exit code says why
    # Every throw comes before the first change, or at the very end with all that failed.
    first_change = restore
    last = uninstall.rindex("throw ")
    throws = [m.start() for m in re.finditer(r"\bthrow\b", uninstall)]
    assert all(t < first_change or t == last for t in throws), "a throw halfway through the uninstall"
    assert "uninstall incomplete" in uninstall[last:]
    tries = uninstall[first_change - 200 :]
    assert tries.count("try {") >= 2 and "$failures +=" in tries


def test_the_installer_has_no_powershell_7_only_syntax(code: str) -> None:
    # Windows PowerShell 5.1 is the target: no ??, ??=, ?. , ternary, nor && / || chains.
    strings = re.sub(r"'[^']*'|\"(?:`.|[^\"`])*\"", "''", code)
    assert not re.search(r"\?\?|\?\.|&&|\|\|", strings)
    assert not re.search(r"\)\s*\?\s*\S.*\s:\s", strings), "a ternary"
    assert not re.search(r"\s-Parallel\b|\bclean\s*\{", strings)


def test_the_installer_examples_pass_only_parameters_it_declares() -> None:
    text = INSTALLER.read_text()
    code = _ps_code(text)
    params = set(re.findall(r"\[(?:string|switch)\]\s*\$(\w+)", code))
    examples = re.findall(r"^\.EXAMPLE\n(.*?)(?:\n\n|\n#>)", text, re.S | re.M)
    used = {p for ex in examples for p in re.findall(r"\s-([A-Z]\w+)", ex)}
    assert used and used <= params, used - params


def test_the_installer_is_ascii_so_windows_powershell_reads_it_as_written() -> None:
    # Windows PowerShell 5.1 reads a script without a BOM in the ANSI code page.
    INSTALLER.read_bytes().decode("ascii")


# -- the grammar parse `make lint` runs

# Without CI only: in CI the test extra is installed, and a missing grammar must fail, not skip.
needs_grammar = pytest.mark.skipif(
    importlib.util.find_spec("tree_sitter_powershell") is None and not os.environ.get("CI"),
    reason="pip install tree-sitter tree-sitter-powershell (the test extra)",
)


def _ps_parse(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PS_PARSE), *map(str, paths)], capture_output=True, text=True, timeout=60, check=False
    )


@needs_grammar
def test_every_windows_script_parses_with_the_powershell_grammar() -> None:
    scripts = sorted((REPO / "examples" / "windows").glob("*.ps1"))
    assert INSTALLER in scripts
    run = _ps_parse(*scripts)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_grammar
def test_a_broken_copy_of_the_installer_fails_naming_file_line_and_column(tmp_path: Path) -> None:
    lines = INSTALLER.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("$probe = Invoke-Python"))
    broken = tmp_path / "broken.ps1"
    # A condition whose parenthesis is never closed, as a slip of the hand leaves it.
    broken.write_text("".join([*lines[:at], "if ($probe.Code -ne 0 {\n", *lines[at:]]))
    run = _ps_parse(broken)
    assert run.returncode == 1, run.stdout + run.stderr
    places = re.findall(rf"^{re.escape(str(broken))}:(\d+):(\d+): ", run.stdout, re.M)
    assert places, run.stdout
    assert all(int(line) >= 1 and int(col) >= 1 for line, col in places)


@needs_grammar
@pytest.mark.parametrize(
    ("snippet", "line"),
    [
        ("$a = 1\n$b = $a ?? 2\n", 2),  # PowerShell 7's null-coalescing operator
        ("$a = 1\nfoo.exe && bar.exe\n", 2),  # PowerShell 7's pipeline chain operator
        ("function F {\n  $a = (1\n}\n", 2),
    ],
)
def test_ps_parse_names_the_line_of_what_windows_powershell_would_reject(
    tmp_path: Path, snippet: str, line: int
) -> None:
    script = tmp_path / "s.ps1"
    script.write_text(snippet)
    run = _ps_parse(script)
    assert run.returncode == 1 and f"{script}:{line}:" in run.stdout, run.stdout


@needs_grammar
def test_ps_parse_accepts_a_clean_script_and_refuses_a_missing_file(tmp_path: Path) -> None:
    script = tmp_path / "ok.ps1"
    script.write_text('param([string] $Name)\nif ($Name) { Write-Host "hello $Name" }\n')
    assert _ps_parse(script).returncode == 0
    assert _ps_parse(tmp_path / "absent.ps1").returncode == 2
