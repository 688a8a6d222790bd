<#
.SYNOPSIS
  Installs obuilder-reconcile on a Windows OBuilder (HCS) worker as a service that repairs the
  store before the worker starts, then keeps it in agreement with containerd.

.DESCRIPTION
  One Windows service, "obuilder-reconcile", running `python.exe -I -m controller service`
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

  Everything is checked first, as the service will see it, and nothing changes unless it all holds:
  - Python runs isolated (python.exe -I: no user site-packages, no PYTHON* variables, not the
    current folder on sys.path) from the system folder ($env:SystemRoot\System32), the service's
    working folder as LocalSystem: a checkout's controller\ or a `pip install --user` cannot
    satisfy a check the service would then fail;
  - the policy validates (`reconcile check-policy`), and its effective form (`check-policy --json`)
    recognises the worker: the worker's executable name (without .exe) is in
    spec.worker.processNames, and spec.worker.serviceName, when set, is the worker's service
    (unset, the script says to set it: the service manager's answer is exact where a process
    listing infers);
  - spec.store.root is the worker's store: the ROOT of --store=hcs:ROOT in the worker service's
    command line;
  - spec.containerd.ctr, found as LocalSystem finds it (a full path as is; a bare name in
    python.exe's folder, the system folders, then the MACHINE Path of the registry, which a
    service sees as it was at boot, not this session's $env:PATH), answers `ctr --version` like ctr.

  The worker's dependencies (DependOnService and DependOnGroup) are kept: only our name is added
  to its services. -Uninstall stops the service and waits until it has stopped, then removes only
  our name from the current dependencies of every service, then deletes the service; it keeps the
  logs. Running the script again updates the installation.

  StateDir is SYSTEM's and Administrators' only (its inherited permissions are removed).
  This script's own log: StateDir\logs\install.jsonl; the service's: StateDir\logs\reconcile.jsonl.
  Both are UTF-8 JSON lines, one object a line. After starting the service the script waits (at
  most 10 minutes) until it runs or has stopped, and prints its state, exit code and reason.

  $Python must be the python.exe of a plain Python installation (python.org's installer, for all
  users) into which `pip install "obuilder-reconcile[windows]"` was run: not reconcile.exe and not a
  virtual environment's python.exe, which are launchers that start a second process, one the
  service manager cannot talk to.

  Written for Windows PowerShell 5.1 (the one Windows Server ships).

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
# Written by versions of this script before 0.1.1; never read (anyone could have written it), only removed.
$SavedDependencies = Join-Path $StateDir 'worker-dependencies.json'
# The working folder of a service: every native program runs from here, as the service will run it.
$SystemDir = Join-Path $env:SystemRoot 'System32'
$MachineEnvironment = 'HKLM:\SYSTEM\CurrentControlSet\Control\Session Manager\Environment'
$StartWaitSeconds = 600   # the boot pass may take long on a big store; the wait is only for the report
$StopWaitSeconds = 600    # a stop lets the action under way finish (at most spec.containerd.callTimeout)
# ``ctr --version``'s first line, as controller/adapters/ctr.py checks it: "ctr github.com/containerd/containerd/v2 2.1.1".
$CtrVersion = '^ctr(\.exe)?\s+\S+.*\d'
# The well-known SIDs, so that the ACL does not depend on the system's language.
$LocalSystemSid = 'S-1-5-18'
$AdministratorsSid = 'S-1-5-32-544'
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
    # It runs from the system folder, a service's working folder, so the admin's folder plays no part.
    $ErrorActionPreference = 'Continue'
    if (-not (Get-Command -Name $Exe -CommandType Application -ErrorAction SilentlyContinue)) {
        return [pscustomobject]@{ Code = -1; Output = "not found: $Exe" }
    }
    Push-Location -LiteralPath $SystemDir
    try {
        $out = & $Exe @Arguments 2>&1 | ForEach-Object { "$_" } | Out-String
        $code = $LASTEXITCODE
    } catch {
        $out = "$_"
        $code = -1
    } finally {
        Pop-Location
    }
    return [pscustomobject]@{ Code = $code; Output = $out.Trim() }
}

function Invoke-Python([string[]] $Arguments) {
    # Isolated, as the service runs it: -I ignores PYTHON* variables and the user's site-packages,
    # and puts neither the current folder nor a script's on sys.path.
    return Invoke-Native $Python (@('-I') + $Arguments)
}

function Invoke-Sc([string[]] $Arguments) {
    $run = Invoke-Native 'sc.exe' $Arguments
    if ($run.Code -ne 0) {
        Write-Log 'error' "sc.exe $($Arguments -join ' ') failed" @{ exit = $run.Code; output = $run.Output }
        throw "sc.exe $($Arguments -join ' ') failed (exit $($run.Code)): $($run.Output)"
    }
}

function Protect-StateDir {
    # Only SYSTEM and Administrators may write here: the service and this script read what is here.
    # The permissions inherited from C:\ProgramData (where users may create files) are removed.
    New-Item -ItemType Directory -Force -Path $StateDir | Out-Null
    $acl = New-Object System.Security.AccessControl.DirectorySecurity
    $acl.SetAccessRuleProtection($true, $false)
    foreach ($sid in @($LocalSystemSid, $AdministratorsSid)) {
        $identity = New-Object System.Security.Principal.SecurityIdentifier $sid
        $rule = New-Object System.Security.AccessControl.FileSystemAccessRule(
            $identity, 'FullControl', 'ContainerInherit, ObjectInherit', 'None', 'Allow')
        $acl.AddAccessRule($rule)
    }
    $acl.SetOwner((New-Object System.Security.Principal.SecurityIdentifier $AdministratorsSid))
    Set-Acl -LiteralPath $StateDir -AclObject $acl
    $granted = @((Get-Acl -LiteralPath $StateDir).Access | ForEach-Object {
        $_.IdentityReference.Translate([System.Security.Principal.SecurityIdentifier]).Value
    } | Sort-Object -Unique)
    $others = @($granted | Where-Object { $_ -ne $LocalSystemSid -and $_ -ne $AdministratorsSid })
    if ($others.Count -gt 0 -or -not (Get-Acl -LiteralPath $StateDir).AreAccessRulesProtected) {
        throw "could not limit $StateDir to SYSTEM and Administrators (still granted: $($others -join ', '))"
    }
}

function Get-RegistryList([string] $Key, [string] $Value) {
    $item = Get-ItemProperty -LiteralPath $Key -Name $Value -ErrorAction SilentlyContinue
    if ($null -eq $item) { return @() }
    return @($item.$Value | Where-Object { $_ })
}

function Get-Dependencies([string] $Name) {
    # Both lists: services (DependOnService) and load-order groups (DependOnGroup).
    $key = "HKLM:\SYSTEM\CurrentControlSet\Services\$Name"
    return [pscustomobject]@{
        Services = @(Get-RegistryList $key 'DependOnService')
        Groups = @(Get-RegistryList $key 'DependOnGroup')
    }
}

function Set-Dependencies([string] $Name, [string[]] $Services, [string[]] $Groups) {
    # sc.exe config depend= replaces both lists: services, and groups written +GROUP, slash-separated;
    # a lone slash clears them. Every group is passed back, so none is lost.
    $all = @($Services) + @($Groups | ForEach-Object { "+$_" })
    $list = if ($all.Count -gt 0) { $all -join '/' } else { '/' }
    Invoke-Sc @('config', $Name, 'depend=', $list)
    $now = Get-Dependencies $Name
    if ((@($now.Services) -join '/') -ne (@($Services) -join '/') -or (@($now.Groups) -join '/') -ne (@($Groups) -join '/')) {
        throw ("dependencies of ${Name}: set services [$($Services -join ', ')] groups [$($Groups -join ', ')], " +
               "read back services [$($now.Services -join ', ')] groups [$($now.Groups -join ', ')]")
    }
    Write-Log 'info' "dependencies of $Name set" @{ service = $Name; services = $Services; groups = $Groups }
}

function Get-ExecutablePath([string] $PathName) {
    # Win32_Service.PathName is a command line: a quoted path, or an unquoted one up to .exe.
    if ($PathName -match '^\s*"([^"]+)"') { return $Matches[1] }
    if ($PathName -match '^\s*(\S.*?\.exe)(\s|$)') { return $Matches[1] }
    return $PathName.Trim()
}

function Get-StoreRoot([string] $PathName) {
    # OBuilder's --store=hcs:ROOT (or --store hcs:ROOT) in the worker's command line, quoted or not.
    if ($PathName -match '"--store[= ]hcs:([^"]+)"') { return $Matches[1] }
    if ($PathName -match '--store(=|\s+)"hcs:([^"]+)"') { return $Matches[2] }
    if ($PathName -match '--store(=|\s+)hcs:(\S+)') { return $Matches[2] }
    return $null
}

function Get-NormalPath([string] $Path) {
    return [System.IO.Path]::GetFullPath($Path).TrimEnd('\')
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

function Resolve-Ctr([string] $Ctr) {
    # As the service, LocalSystem, finds it: CreateProcess looks in python.exe's folder, the
    # working folder (System32) and the Windows folders, then in the PATH the service manager
    # gave it, the MACHINE Path as it was at boot (not this session's $env:PATH).
    # Paths are joined with [IO.Path]::Combine: Join-Path fails on a drive that does not exist.
    if ([System.IO.Path]::IsPathRooted($Ctr)) { return $Ctr }
    if ($Ctr.Contains('\') -or $Ctr.Contains('/')) { return [System.IO.Path]::Combine($SystemDir, $Ctr) }
    $name = $Ctr
    if (-not [System.IO.Path]::HasExtension($Ctr)) { $name = "$Ctr.exe" }   # as CreateProcess does
    $machinePath = @(Get-RegistryList $MachineEnvironment 'Path')
    $folders = @((Split-Path -Parent $Python), $SystemDir, $env:SystemRoot) +
               @($machinePath -join ';' -split ';' | ForEach-Object { $_.Trim().Trim('"') } | Where-Object { $_ })
    foreach ($folder in $folders) {
        try {
            $candidate = [System.IO.Path]::Combine([System.Environment]::ExpandEnvironmentVariables($folder), $name)
            if (Test-Path -LiteralPath $candidate -PathType Leaf) { return $candidate }
        } catch {
            continue   # a Path entry with characters a path cannot have: CreateProcess skips it too
        }
    }
    return $null
}

function Wait-ServiceState([string] $Name, [string[]] $States, [int] $Seconds) {
    # Polls until the service is in one of $States, or $Seconds have passed: its last state either way.
    $deadline = (Get-Date).AddSeconds($Seconds)
    while ($true) {
        $svc = Get-CimInstance Win32_Service -Filter "Name='$Name'"
        if ($null -eq $svc -or $States -contains $svc.State -or (Get-Date) -ge $deadline) { return $svc }
        Start-Sleep -Seconds 2
    }
}

function Get-StatusReason([string] $StatusPath, [datetime] $Since) {
    # The service's last pass as its status file tells it, marked when it predates this start.
    if (-not $StatusPath -or -not (Test-Path -LiteralPath $StatusPath -PathType Leaf)) { return 'no status file yet' }
    try {
        $status = Get-Content -LiteralPath $StatusPath -Raw -Encoding UTF8 | ConvertFrom-Json
    } catch {
        return "status file $StatusPath unreadable: $_"
    }
    $said = "last pass: $($status.outcome)"
    $errorField = $status.PSObject.Properties['error']
    if ($null -ne $errorField -and $errorField.Value) { $said = "$said, $($errorField.Value)" }
    if ((Get-Item -LiteralPath $StatusPath).LastWriteTime -lt $Since) { $said = "$said (written before this start)" }
    return "$said ($StatusPath)"
}

function Get-EventReason([string] $Source, [datetime] $Since) {
    try {
        $events = @(Get-WinEvent -FilterHashtable @{ LogName = 'Application'; ProviderName = $Source; StartTime = $Since } `
            -MaxEvents 1 -ErrorAction SilentlyContinue)
    } catch {
        return $null
    }
    if ($events.Count -eq 0) { return $null }
    return ($events[0].Message -split "`n")[0].Trim()
}

if ($Uninstall) {
    Protect-StateDir
    # 1. Stop our service and wait until it has stopped. Until it has, nothing has changed: a refusal
    #    here leaves the installation whole.
    $svc = Get-CimInstance Win32_Service -Filter "Name='$ServiceName'"
    if ($null -ne $svc -and $svc.State -ne 'Stopped') {
        if ($svc.State -ne 'Running') { $svc = Wait-ServiceState $ServiceName @('Running', 'Stopped') $StopWaitSeconds }
        if ($null -ne $svc -and $svc.State -eq 'Running') {
            $stop = Invoke-Native 'sc.exe' @('stop', $ServiceName)
            if ($stop.Code -eq 1051) {
                $running = @(Get-CimInstance Win32_Service | Where-Object {
                    $_.State -ne 'Stopped' -and (@((Get-Dependencies $_.Name).Services) -contains $ServiceName)
                } | ForEach-Object { $_.Name })
                throw ("$ServiceName cannot stop while services that depend on it run ($($running -join ', ')); " +
                       "nothing changed. Stop them first (Stop-Service $($running -join ', ')), then run -Uninstall again")
            }
            if ($stop.Code -ne 0 -and $stop.Code -ne 1062) {   # 1062: not started
                throw "sc.exe stop $ServiceName failed (exit $($stop.Code)): $($stop.Output); nothing changed"
            }
        }
        $svc = Wait-ServiceState $ServiceName @('Stopped') $StopWaitSeconds
        if ($null -ne $svc -and $svc.State -ne 'Stopped') {
            throw "$ServiceName is still $($svc.State) after $StopWaitSeconds s; nothing changed: run -Uninstall again once it has stopped"
        }
    }
    if ($null -ne $svc) { Write-Log 'info' "service $ServiceName stopped" }

    # 2. Our name out of every service's CURRENT dependencies; every other service and group stays.
    #    From here on a failure is collected, not thrown, so each step that can be done is done.
    $failures = @()
    foreach ($other in @(Get-CimInstance Win32_Service)) {
        $deps = Get-Dependencies $other.Name
        if (@($deps.Services) -notcontains $ServiceName) { continue }
        try {
            Set-Dependencies $other.Name @($deps.Services | Where-Object { $_ -ne $ServiceName }) @($deps.Groups)
        } catch {
            $failures += "dependencies of $($other.Name): $_"
        }
    }

    # 3. Delete the service, unless a service still depends on it (it would then not start at all).
    if ($failures.Count -gt 0) {
        $failures += "service $ServiceName kept, as services still depend on it"
    } elseif ($null -ne $svc) {
        try {
            Invoke-Sc @('delete', $ServiceName)
            Write-Log 'info' "service $ServiceName removed"
        } catch {
            $failures += "delete ${ServiceName}: $_"
        }
    }
    if (Test-Path -LiteralPath $SavedDependencies) { Remove-Item -LiteralPath $SavedDependencies -ErrorAction SilentlyContinue }
    if ($failures.Count -gt 0) {
        Write-Log 'error' 'uninstall incomplete; run -Uninstall again once fixed' @{ failures = $failures }
        throw "uninstall incomplete (run -Uninstall again once fixed): $($failures -join '; ')"
    }
    Write-Log 'info' 'uninstalled; logs are kept' @{ logs = $LogDir }
    return
}

# -- Install or update: first every check, as the service will see things; nothing changes until they pass

foreach ($path in @($Python, $Policy)) {
    if (-not (Test-Path -LiteralPath $path -PathType Leaf)) { throw "not found: $path" }
}
$Python = (Resolve-Path -LiteralPath $Python).Path
$Policy = (Resolve-Path -LiteralPath $Policy).Path
Protect-StateDir
if (-not (Get-Service -Name $ContainerdService -ErrorAction SilentlyContinue)) {
    throw "no service named $ContainerdService (containerd's service; pass -ContainerdService)"
}

# The interpreter must host a service itself (not a venv launcher, pywin32 importable) and import
# the package from its own site-packages, isolated and from the system folder, as the service will.
$probe = Invoke-Python @('-c', 'import sys, win32serviceutil, servicemanager, controller; print(sys.prefix == sys.base_prefix); print(controller.__file__)')
$probeLines = @($probe.Output -split "`r?`n")
if ($probe.Code -ne 0 -or $probeLines[0].Trim() -ne 'True') {
    Write-Log 'error' 'the interpreter cannot host the service; nothing changed' @{ python = $Python; output = $probe.Output }
    throw ("$Python cannot host the service, run as the service runs it ($Python -I, from $SystemDir): $($probe.Output). " +
           "Use a plain Python for all users and run, as Administrator: & '$Python' -m pip install 'obuilder-reconcile[windows]' " +
           "(not --user, not a venv)")
}
Write-Log 'info' "the service will import controller from $($probeLines[-1].Trim())" @{ python = $Python }

# Nothing changes unless the policy validates. Exit 2: the message names file:line:column.
$check = Invoke-Python @('-m', 'controller', 'check-policy', $Policy)
if ($check.Code -ne 0) {
    Write-Log 'error' 'the policy does not validate; nothing changed' @{ policy = $Policy; output = $check.Output }
    throw "the policy does not validate: $($check.Output)"
}
Write-Log 'info' $check.Output
# The policy as the service will read it, every default filled in: how it recognises the worker.
$effective = Invoke-Python @('-m', 'controller', 'check-policy', '--json', $Policy)
if ($effective.Code -ne 0) { throw "check-policy --json failed (exit $($effective.Code)): $($effective.Output)" }
$spec = ($effective.Output | ConvertFrom-Json).spec
$workerSpec = $spec.worker

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

# The store the service repairs must be the worker's: spec.store.root against --store=hcs:ROOT.
$workerStore = Get-StoreRoot $worker.PathName
if (-not $workerStore) {
    Write-Log 'error' "the worker's command line has no --store=hcs:ROOT; nothing changed" @{ service = $worker.Name; path = $worker.PathName }
    throw ("the worker service $($worker.Name) has no --store=hcs:ROOT in its command line ($($worker.PathName)): " +
           "obuilder-reconcile repairs OBuilder's HCS store, and cannot tell which one the worker uses")
}
if (-not $spec.store.root) {
    Write-Log 'error' 'the policy has no spec.store.root; nothing changed' @{ policy = $Policy; workerStore = $workerStore }
    throw "spec.store.root is not set in ${Policy}: set spec.store.root: '$workerStore' (the worker's --store=hcs:$workerStore)"
}
if ((Get-NormalPath $spec.store.root) -ne (Get-NormalPath $workerStore)) {
    Write-Log 'error' "the policy's store is not the worker's; nothing changed" @{ policy = $Policy; root = $spec.store.root; workerStore = $workerStore }
    throw ("spec.store.root in $Policy is '$($spec.store.root)', but the worker service $($worker.Name) runs with " +
           "--store=hcs:${workerStore}: set spec.store.root: '$workerStore' in $Policy")
}

# ctr as the service will run it.
$ctr = 'ctr.exe'
if ($spec.containerd.ctr) { $ctr = $spec.containerd.ctr }
$ctrFix = ("set spec.containerd.ctr in $Policy to the full path of ctr.exe (containerd's Windows " +
           "instructions put it in C:\Program Files\containerd\ctr.exe)")
$ctrPath = Resolve-Ctr $ctr
if (-not $ctrPath -or -not (Test-Path -LiteralPath $ctrPath -PathType Leaf)) {
    Write-Log 'error' 'the service would not find ctr; nothing changed' @{ policy = $Policy; ctr = $ctr }
    throw ("spec.containerd.ctr in $Policy is '$ctr', which the service (LocalSystem: python.exe's folder, the system " +
           "folders, then the MACHINE Path at boot, not this session's PATH) would not find: $ctrFix")
}
$ctrRun = Invoke-Native $ctrPath @('--version')
$ctrSaid = @($ctrRun.Output -split "`r?`n")[0].Trim()
if ($ctrRun.Code -ne 0 -or $ctrSaid -notmatch $CtrVersion) {
    Write-Log 'error' 'spec.containerd.ctr is not ctr; nothing changed' @{ policy = $Policy; ctr = $ctrPath; exit = $ctrRun.Code; output = $ctrRun.Output }
    throw ("spec.containerd.ctr in $Policy is '$ctr' ($ctrPath), but ``$ctrPath --version`` exited $($ctrRun.Code) " +
           "and printed '$ctrSaid', where ctr prints 'ctr github.com/containerd/containerd VERSION': $ctrFix")
}
Write-Log 'info' "ctr: $ctrPath ($ctrSaid)" @{ ctr = $ctrPath; version = $ctrSaid }
$statusPath = Join-Path $spec.store.root 'state\obuilder-reconcile\status.json'
if ($spec.status.path) { $statusPath = $spec.status.path }

# -- The changes ------------------------------------------------------------------------------

$binPath = "`"$Python`" -I -m controller service --service-name $ServiceName --policy `"$Policy`" " +
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

# The worker depends on us: our name is added to its services, its other services and its groups
# (DependOnGroup, which sc.exe config depend= would drop unless passed back) are kept.
$workerDeps = Get-Dependencies $worker.Name
if (@($workerDeps.Services) -notcontains $ServiceName) {
    Set-Dependencies $worker.Name (@($workerDeps.Services) + $ServiceName) @($workerDeps.Groups)
}
if (Test-Path -LiteralPath $SavedDependencies) {
    Remove-Item -LiteralPath $SavedDependencies
    Write-Log 'info' "removed $SavedDependencies of an earlier install (-Uninstall now reads the current dependencies)"
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
Write-Log 'info' 'installed' @{ service = $ServiceName; worker = $worker.Name; logs = $LogDir }

# Start it now and wait for its outcome. Beside a running worker the boot pass is skipped (exit 9
# semantics) and it runs as the daemon; with the worker stopped it repairs first. The worker is left as it was.
$final = Get-CimInstance Win32_Service -Filter "Name='$ServiceName'"
if ($final.State -eq 'Stopped') {
    $startedAt = Get-Date
    Invoke-Sc @('start', $ServiceName)
    Write-Log 'info' "service $ServiceName starting; waiting up to $StartWaitSeconds s for it to run or stop"
    $final = Wait-ServiceState $ServiceName @('Running', 'Stopped') $StartWaitSeconds
    # Win32ExitCode 1066 (ERROR_SERVICE_SPECIFIC_ERROR): our exit code is the service-specific one.
    $code = $final.ExitCode
    if ($final.ExitCode -eq 1066) { $code = $final.ServiceSpecificExitCode }
    $reason = Get-StatusReason $statusPath $startedAt
    $logged = Get-EventReason $ServiceName $startedAt
    if ($logged) { $reason = "$reason; Event Log: $logged" }
    $outcome = @{ state = $final.State; exit = $code; win32ExitCode = $final.ExitCode; serviceExitCode = $final.ServiceSpecificExitCode; reason = $reason }
    if ($final.State -eq 'Running') {
        Write-Log 'info' "service ${ServiceName}: Running, exit code $code; $reason" $outcome
    } elseif ($final.State -eq 'Stopped') {
        Write-Log 'error' "service ${ServiceName}: Stopped, exit code $code; $reason" $outcome
        throw ("$ServiceName is installed but stopped with exit code $code (README, Exit codes): $reason. " +
               "Fix that, then Start-Service $($worker.Name) (which starts $ServiceName first)")
    } else {
        Write-Log 'warning' "service ${ServiceName}: still $($final.State) after $StartWaitSeconds s (the boot pass goes on; see $(Join-Path $LogDir 'reconcile.jsonl'))" $outcome
    }
} else {
    Write-Log 'info' "service ${ServiceName}: $($final.State) (left as it is)" @{ state = $final.State }
}
Write-Host "Metrics: http://127.0.0.1:9847/metrics (the policy's spec.metrics). Status: sc.exe queryex $ServiceName"
