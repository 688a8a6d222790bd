<#
.SYNOPSIS
  Installs obuilder-reconcile on a Windows OBuilder (HCS) worker.

.DESCRIPTION
  Two scheduled tasks, both running as SYSTEM:
  - "obuilder-reconcile-boot", at start-up: stops nothing, runs `reconcile --once`, and only
    then starts the worker service. The worker service is set to start on demand, so the
    repair always finishes before the worker starts.
  - "obuilder-reconcile", at start-up after the boot task: the daemon beside the worker,
    restarted if it fails. Stop-ScheduledTask sends it Ctrl-Break; it finishes the action
    under way and exits 0.

.EXAMPLE
  .\install-obuilder-reconcile.ps1 -Reconcile 'C:\Program Files\obuilder-reconcile\reconcile.exe' `
      -Policy 'C:\ProgramData\obuilder-reconcile\policy.yaml' -WorkerService ocluster-worker
#>
[CmdletBinding(SupportsShouldProcess)]
param(
    [Parameter(Mandatory)] [string] $Reconcile,
    [Parameter(Mandatory)] [string] $Policy,
    [string] $WorkerService = 'ocluster-worker',
    [string] $LogDir = 'C:\ProgramData\obuilder-reconcile\logs'
)
$ErrorActionPreference = 'Stop'

foreach ($path in @($Reconcile, $Policy)) {
    if (-not (Test-Path -LiteralPath $path)) { throw "not found: $path" }
}
if (-not (Get-Service -Name $WorkerService -ErrorAction SilentlyContinue)) {
    throw "no service named $WorkerService"
}
New-Item -ItemType Directory -Force -Path $LogDir | Out-Null

# Check the policy before anything changes: exit 2 means it does not validate.
& $Reconcile --once --dry-run --policy $Policy | Out-Null
if ($LASTEXITCODE -eq 2) { throw "the policy $Policy does not validate; run: $Reconcile --once --dry-run --policy $Policy" }

# The worker starts only when the boot repair has run.
Set-Service -Name $WorkerService -StartupType Manual

$principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
$settings = New-ScheduledTaskSettingsSet -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries `
    -ExecutionTimeLimit ([TimeSpan]::Zero) -RestartCount 999 -RestartInterval (New-TimeSpan -Minutes 1)

$boot = "& '$Reconcile' --once --policy '$Policy' *>> '$LogDir\boot.log'; " +
        "if (`$LASTEXITCODE -ne 2) { Start-Service -Name '$WorkerService' }"
$bootAction = New-ScheduledTaskAction -Execute 'powershell.exe' `
    -Argument "-NoProfile -NonInteractive -ExecutionPolicy Bypass -Command `"$boot`""
Register-ScheduledTask -TaskName 'obuilder-reconcile-boot' -Action $bootAction -Principal $principal `
    -Settings $settings -Trigger (New-ScheduledTaskTrigger -AtStartup) -Force | Out-Null

$daemon = "& '$Reconcile' --policy '$Policy' --log-format json *>> '$LogDir\daemon.log'"
$daemonAction = New-ScheduledTaskAction -Execute 'powershell.exe' `
    -Argument "-NoProfile -NonInteractive -ExecutionPolicy Bypass -Command `"$daemon`""
$daemonTrigger = New-ScheduledTaskTrigger -AtStartup
$daemonTrigger.Delay = 'PT2M'   # after the boot repair and the worker
Register-ScheduledTask -TaskName 'obuilder-reconcile' -Action $daemonAction -Principal $principal `
    -Settings $settings -Trigger $daemonTrigger -Force | Out-Null

Write-Host "Installed. Boot repair log: $LogDir\boot.log; daemon log: $LogDir\daemon.log"
Write-Host "Metrics: http://127.0.0.1:9847/metrics (see the policy's spec.metrics)"
