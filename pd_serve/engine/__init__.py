"""The engine: requests, sampling, page allocation, prefix cache, scheduler, runner and the loop.

Call order of one step (`EngineCore.step`): `Scheduler.schedule() -> ScheduleOutput`,
`ModelRunner.run(ScheduleOutput) -> RunnerOutput`, `EngineCore` applies the sampled tokens
(stop checks, detokenization) and tells the scheduler which requests finished. The engine never
imports `server` or `frontend`; API processes reach it only through `engine.messages`.
"""
