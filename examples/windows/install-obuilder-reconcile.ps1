<#
.SYNOPSIS
  Installs obuilder-reconcile on a Windows OBuilder (HCS) worker as a service that repairs the
  store before the worker starts, then keeps it in agreement with containerd.

.DESCRIPTION
  One Windows service, "obuilder-reconcile", running `python.exe -m controller service`
  (pywin32's service framework, as LocalSystem):
  - it depends on containerd's service, so the service manager starts it after containerd;
  - while it waits for containerd and runs the boot pass (reconcile --once semantics) it reports
    start-pending; then it reports running and goes on as the daemon;
  - the worker's service (found by its executable, ocluster-worker.exe, not by its name, which is
    ocluster's --name) is made to depend on it, so the service manager starts the worker only
    after the repair, and not at all when the repair must keep it down: the service then stops
    as failed with its exit code (README, "Exit codes") and the reason in the Application Event Log;
  - recovery actions restart it after a failure (1 min, 1 min, 5 min; the count resets after a day);
  - a service stop (or Stop-Service) lets the action under way finish.

  The policy is checked first with `reconcile check-policy` (no store, worker or containerd
  needed); nothing changes when it does not validate, nor when it would not recognise the worker:
  the worker's executable name (without .exe) must be in its spec.worker.processNames, and its
  spec.worker.serviceName, when set, must be the worker's service (unset, the script says to set
  it: the service manager's answer is exact where a process listing infers). Running the script
  again updates the installation. -Uninstall removes the service and gives the worker back the
  dependencies it had before the first install (saved in StateDir\worker-dependencies.json).

  This script's own log: StateDir\logs\install.jsonl; the service's: StateDir\logs\reconcile.jsonl.
  Both are UTF-8 JSON lines, one object a line.

  $Python must be the python.exe of a plain Python installation (python.org's installer, for all
  users) into which `pip install "obuilder-reconcile[windows]"` was run: not reconcile.exe and not a
  virtual environment's python.exe, which are launchers that start a second process, one the
  service manager cannot talk to.

.EXAMPLE
  .\install-obuilder-reconcile.ps1 -Python 'C:\Program Files\Python311\python.exe' `
      -Policy 'C:\ProgramData\obuilder-reconcile\policy.yaml'

.EXAMPLE
  .\install-obuilder-reconcile.ps1 -Uninstall
#>
[CmdletBinding(DefaultParameterSetName = 'Install')]
param(
    [Parameter(Mandatory, ParameterSetName = 'Install')] [string] $Python,
    [Parameter(Mandatory, ParameterSetName = 'Install')] [string] $Policy,
    [Parameter(ParameterSetName = 'Install')] [string] $ContainerdService = 'containerd',
    [Parameter(ParameterSetName = 'Install')] [string] $WorkerExe = 'ocluster-worker.exe',
    [Parameter(ParameterSetName = 'Uninstall')] [switch] $Uninstall,
    [string] $ServiceName = 'obuilder-reconcile',
    [string] $StateDir = 'C:\ProgramData\obuilder-reconcile'
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$LogDir = Join-Path $StateDir 'logs'
$InstallLog = Join-Path $LogDir 'install.jsonl'
$SavedDependencies = Join-Path $StateDir 'worker-dependencies.json'
$Utf8 = New-Object System.Text.UTF8Encoding $false   # no BOM; Windows PowerShell's *>> would write UTF-16

function Write-Log([string] $Level, [string] $Message, [hashtable] $Fields = @{}) {
    $record = [ordered]@{ time = (Get-Date).ToUniversalTime().ToString('o'); level = $Level; message = $Message }
    foreach ($key in $Fields.Keys) { $record[$key] = $Fields[$key] }
    New-Item -ItemType Directory -Force -Path $LogDir | Out-Null
    [System.IO.File]::AppendAllText($InstallLog, ($record | ConvertTo-Json -Compress) + "`n", $Utf8)
    Write-Host "$Level $Message"
}

function Invoke-Native([string] $Exe, [string[]] $Arguments) {
    # Windows PowerShell 5.1 turns the stderr of a native program, once redirected, into error
    # records that 'Stop' throws on: take it as text, and let the caller judge the exit code.
    $ErrorActionPreference = 'Continue'
    $out = & $Exe @Arguments 2>&1 | ForEach-Object { "$_" } | Out-String
    return [pscustomobject]@{ Code = $LASTEXITCODE; Output = $out.Trim() }
}

function Invoke-Sc([string[]] $Arguments) {
    $run = Invoke-Native 'sc.exe' $Arguments
    if ($run.Code -ne 0) {
        Write-Log 'error' "sc.exe $($Arguments -join ' ') failed" @{ exit = $run.Code; output = $run.Output }
        throw "sc.exe $($Arguments -join ' ') failed (exit $($run.Code)): $($run.Output)"
    }
}

function Get-Dependencies([string] $Name) {
    $key = "HKLM:\SYSTEM\CurrentControlSet\Services\$Name"
    $value = (Get-ItemProperty -LiteralPath $key -Name DependOnService -ErrorAction SilentlyContinue)
    if ($null -eq $value) { return @() }
    return @($value.DependOnService | Where-Object { $_ })
}

function Set-Dependencies([string] $Name, [string[]] $Dependencies) {
    # sc.exe takes them slash-separated; a lone slash clears them.
    $list = if ($Dependencies.Count -gt 0) { $Dependencies -join '/' } else { '/' }
    Invoke-Sc @('config', $Name, 'depend=', $list)
    Write-Log 'info' "dependencies of $Name set" @{ service = $Name; dependencies = $Dependencies }
}

function Get-ExecutablePath([string] $PathName) {
    # Win32_Service.PathName is a command line: a quoted path, or an unquoted one up to .exe.
    if ($PathName -match '^\s*"([^"]+)"') { return $Matches[1] }
    if ($PathName -match '^\s*(\S.*?\.exe)(\s|$)') { return $Matches[1] }
    return $PathName.Trim()
}

function Find-WorkerService {
    $found = @(Get-CimInstance Win32_Service | Where-Object {
        $_.PathName -and ((Split-Path -Leaf (Get-ExecutablePath $_.PathName)) -ieq $WorkerExe)
    })
    if ($found.Count -eq 0) { throw "no service runs $WorkerExe (looked at every service's PathName); pass -WorkerExe" }
    if ($found.Count -gt 1) {
        throw "several services run ${WorkerExe}: $(($found | ForEach-Object { $_.Name }) -join ', '); one worker a machine"
    }
    return $found[0]
}

function Read-SavedDependencies {
    if (Test-Path -LiteralPath $SavedDependencies) {
        return (Get-Content -LiteralPath $SavedDependencies -Raw -Encoding UTF8 | ConvertFrom-Json)
    }
    return $null
}

if ($Uninstall) {
    $saved = Read-SavedDependencies
    if ($null -ne $saved) {
        # First the worker, so stopping our service does not have to stop it too.
        Set-Dependencies $saved.service @($saved.dependencies | Where-Object { $_ })
    } else {
        foreach ($svc in @(Get-CimInstance Win32_Service)) {
            $deps = @(Get-Dependencies $svc.Name)
            if ($deps -contains $ServiceName) {
                Set-Dependencies $svc.Name @($deps | Where-Object { $_ -ne $ServiceName })
            }
        }
    }
    if (Get-Service -Name $ServiceName -ErrorAction SilentlyContinue) {
        Stop-Service -Name $ServiceName   # the action under way finishes first
        Invoke-Sc @('delete', $ServiceName)
        Write-Log 'info' "service $ServiceName removed"
    }
    if (Test-Path -LiteralPath $SavedDependencies) { Remove-Item -LiteralPath $SavedDependencies }
    Write-Log 'info' 'uninstalled; logs are kept' @{ logs = $LogDir }
    return
}

# -- Install or update ----------------------------------------------------------------------

foreach ($path in @($Python, $Policy)) {
    if (-not (Test-Path -LiteralPath $path -PathType Leaf)) { throw "not found: $path" }
}
$Policy = (Resolve-Path -LiteralPath $Policy).Path
if (-not (Get-Service -Name $ContainerdService -ErrorAction SilentlyContinue)) {
    throw "no service named $ContainerdService (containerd's service; pass -ContainerdService)"
}

# The interpreter must host a service itself: not a venv launcher, and pywin32 importable.
$probe = Invoke-Native $Python @('-c', 'import sys, win32serviceutil; print(sys.prefix == sys.base_prefix)')
if ($probe.Code -ne 0 -or $probe.Output -ne 'True') {
    throw "$Python cannot host the service: $($probe.Output) (a plain Python with 'pip install obuilder-reconcile[windows]', not a venv)"
}

# Nothing changes unless the policy validates. Exit 2: the message names file:line:column.
$check = Invoke-Native $Python @('-m', 'controller', 'check-policy', $Policy)
if ($check.Code -ne 0) {
    Write-Log 'error' 'the policy does not validate; nothing changed' @{ policy = $Policy; output = $check.Output }
    throw "the policy does not validate: $($check.Output)"
}
Write-Log 'info' $check.Output
# The policy as the service will read it, every default filled in: how it recognises the worker.
$effective = Invoke-Native $Python @('-m', 'controller', 'check-policy', '--json', $Policy)
if ($effective.Code -ne 0) { throw "check-policy --json failed (exit $($effective.Code)): $($effective.Output)" }
$workerSpec = ($effective.Output | ConvertFrom-Json).spec.worker

$worker = Find-WorkerService
Write-Log 'info' "worker service: $($worker.Name)" @{ service = $worker.Name; path = $worker.PathName; state = $worker.State }

# The service must know the worker when it sees it: by its executable's name, as the process listing
# shows it (lower-case, without .exe), and by its service's name, which the service manager answers for.
$workerName = [System.IO.Path]::GetFileNameWithoutExtension((Get-ExecutablePath $worker.PathName)).ToLowerInvariant()
$processNames = @($workerSpec.processNames | ForEach-Object { ($_ -replace '\.exe$', '').ToLowerInvariant() })
if ($processNames -notcontains $workerName) {
    Write-Log 'error' 'the policy does not recognise the worker; nothing changed' @{ policy = $Policy; worker = $workerName; processNames = $processNames }
    throw ("the worker service $($worker.Name) runs $workerName, which spec.worker.processNames in $Policy does not " +
           "name ($($processNames -join ', ')): a running worker would look stopped. Add '$workerName' to " +
           "spec.worker.processNames in $Policy")
}
if (-not $workerSpec.serviceName) {
    Write-Log 'warning' "set spec.worker.serviceName: $($worker.Name) in ${Policy}: the service manager then says exactly whether the worker runs" @{ policy = $Policy; service = $worker.Name }
} elseif ($workerSpec.serviceName -ne $worker.Name) {
    Write-Log 'error' 'the policy names another worker service; nothing changed' @{ policy = $Policy; serviceName = $workerSpec.serviceName; service = $worker.Name }
    throw ("spec.worker.serviceName in $Policy is '$($workerSpec.serviceName)', but the worker's service is " +
           "'$($worker.Name)': set spec.worker.serviceName: $($worker.Name) in $Policy")
}

New-Item -ItemType Directory -Force -Path $LogDir | Out-Null
$binPath = "`"$Python`" -m controller service --service-name $ServiceName --policy `"$Policy`" " +
           "--log-format json --log-file `"$(Join-Path $LogDir 'reconcile.jsonl')`""

$existing = Get-CimInstance Win32_Service -Filter "Name='$ServiceName'"
if ($null -ne $existing) {
    # Win32_Service.Change, not sc.exe binPath=: Windows PowerShell passes the quotes inside
    # an argument to a native program unescaped, which would cut the command line.
    $changed = Invoke-CimMethod -InputObject $existing -MethodName Change -Arguments @{
        PathName = $binPath; StartMode = 'Automatic'; DisplayName = 'obuilder-reconcile'
    }
    if ($changed.ReturnValue -ne 0) { throw "Win32_Service.Change of $ServiceName failed: $($changed.ReturnValue)" }
    Invoke-Sc @('config', $ServiceName, 'depend=', $ContainerdService)
    Write-Log 'info' "service $ServiceName updated; the change applies at its next start (the next boot)" @{ binPath = $binPath }
} else {
    New-Service -Name $ServiceName -BinaryPathName $binPath -DisplayName 'obuilder-reconcile' `
        -Description 'Repairs the OBuilder store before the worker starts, then keeps it in agreement with containerd' `
        -StartupType Automatic -DependsOn $ContainerdService | Out-Null
    Write-Log 'info' "service $ServiceName created" @{ binPath = $binPath }
}
# Restart after a failure; failureflag 1: a stop with a non-zero exit code is a failure too.
Invoke-Sc @('failure', $ServiceName, 'reset=', '86400', 'actions=', 'restart/60000/restart/60000/restart/300000')
Invoke-Sc @('failureflag', $ServiceName, '1')

# The worker depends on us: its original dependencies are saved once, at the first install,
# so -Uninstall gives back exactly those.
$current = @(Get-Dependencies $worker.Name)
if (-not (Test-Path -LiteralPath $SavedDependencies)) {
    $original = @($current | Where-Object { $_ -ne $ServiceName })
    $record = [ordered]@{ service = $worker.Name; dependencies = $original; saved = (Get-Date).ToUniversalTime().ToString('o') }
    [System.IO.File]::WriteAllText($SavedDependencies, ($record | ConvertTo-Json -Compress), $Utf8)
    Write-Log 'info' "saved the worker's dependencies" @{ service = $worker.Name; dependencies = $original }
}
if ($current -notcontains $ServiceName) {
    Set-Dependencies $worker.Name @($current + $ServiceName)
}

# The scheduled tasks of earlier versions of this script are replaced by the service; they had
# set the worker to start on demand, which the dependency now makes unnecessary.
foreach ($task in @('obuilder-reconcile-boot', 'obuilder-reconcile')) {
    if (Get-ScheduledTask -TaskName $task -ErrorAction SilentlyContinue) {
        Unregister-ScheduledTask -TaskName $task -Confirm:$false
        Write-Log 'info' "removed the scheduled task $task of an earlier install"
        if ($worker.StartMode -eq 'Manual') {
            Set-Service -Name $worker.Name -StartupType Automatic
            Write-Log 'info' "worker $($worker.Name) set back to start automatically"
        }
    }
}

# Start it now. Beside a running worker the boot pass is skipped (exit 9 semantics) and it runs
# as the daemon; with the worker stopped it repairs first. The worker is left as it was.
if ((Get-Service -Name $ServiceName).Status -eq 'Stopped') {
    Invoke-Sc @('start', $ServiceName)
    Write-Log 'info' "service $ServiceName starting"
}
Write-Log 'info' 'installed' @{ service = $ServiceName; worker = $worker.Name; logs = $LogDir }
Write-Host "Metrics: http://127.0.0.1:9847/metrics (the policy's spec.metrics). Status: sc.exe query $ServiceName"
