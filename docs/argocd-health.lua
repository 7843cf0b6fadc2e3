-- Argo CD health check for vmop.dev/VirtualMachine (Lua 5.1, as Argo CD runs it).
--
-- Install it in the argocd-cm ConfigMap under the key
--   resource.customizations.health.vmop.dev_VirtualMachine
-- (see the README, section GitOps). It reads only what the operator writes: the Ready and Synced
-- conditions and status.powerState.
--
--   Healthy      Ready=True and the VM runs
--   Suspended    Ready=True and the VM is Stopped or Paused as asked, a guest powered itself off and
--                restartPolicy leaves it off, or a node taint holds it off (HeldByTaint: maintenance)
--   Degraded     a reason that needs a person: DomainConflict, StorageNotAllowed, NetworkNotAllowed,
--                OverVmLimits, NodeMemoryFull, InvalidSpec, ShutdownOverdue, HypervisorUnreachable, DefinitionRefused, CrashLoopBackOff, an action
--                libvirt refused (StartFailed, ForceOffFailed, ...: every reason ending in Failed), or a
--                crash/outside destroy left off by restartPolicy
--   Progressing  everything else: Starting, ShuttingDown, Defining, Resuming, ..., or a spec the operator
--                has not acted on yet (the Ready condition's observedGeneration is behind)

local degraded_reasons = {
  DomainConflict = true,
  StorageNotAllowed = true,
  NetworkNotAllowed = true,
  OverVmLimits = true,
  NodeMemoryFull = true,
  InvalidSpec = true,
  ShutdownOverdue = true,
  HypervisorUnreachable = true,
  StoppedCrashed = true,
  StoppedDestroyed = true,
  DefinitionRefused = true,
  CrashLoopBackOff = true,
}

local function is_degraded(reason)
  return degraded_reasons[reason] or string.sub(reason, -6) == "Failed"
end

local function find_condition(status, condition_type)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == condition_type then
      return condition
    end
  end
  return nil
end

local function describe(condition)
  local text = condition.type .. "=" .. condition.status .. " " .. condition.reason
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end

local hs = {}
local status = obj.status
local ready = find_condition(status, "Ready")
local synced = find_condition(status, "Synced")
local overdue = find_condition(status, "ShutdownOverdue")

if ready == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the vmop operator of node " .. tostring(obj.spec and obj.spec.nodeName)
  return hs
end

-- Checked first: Ready stays True for the old spec until the operator has seen the new one.
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "the operator has not acted on generation " .. tostring(generation) .. " yet"
  return hs
end

if overdue ~= nil and overdue.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(overdue)
  return hs
end
for _, condition in ipairs({ ready, synced }) do
  if condition ~= nil and condition.status ~= "True" and is_degraded(condition.reason) then
    hs.status = "Degraded"
    hs.message = describe(condition)
    return hs
  end
end

local power_state = status.powerState
if ready.status == "True" then
  if power_state == "Stopped" or power_state == "Paused" then
    hs.status = "Suspended"
    hs.message = "the VM is " .. power_state .. " as asked"
  else
    hs.status = "Healthy"
    hs.message = "the VM is " .. tostring(power_state)
  end
  return hs
end

if ready.reason == "StoppedGuestInitiated" or ready.reason == "HeldByTaint" then
  hs.status = "Suspended"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready)
return hs
