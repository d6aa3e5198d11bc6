"""The diffusion service: rank 0 takes a request's KV cache over gRPC, every rank denoises its
share of the image, and rank 0 streams progress, previews and the image back.

One request, from gRPC to the last rank and back:

1. `server` serves `bagel.v1.Diffusion` on rank 0 and hands each Generate call to `servicer`,
   which assembles and checks the KV stream (`transport`), the request id and the parameters,
   wraps them in a `JobHandle` around a `job.JobSpec`, queues it on the engine, and then streams
   the handle's events to the caller.
2. `engine` runs on one thread of rank 0 and owns every collective. It takes one job at a time
   and tells every rank of it through the `launch.RankGroup`: a `job` message (a command, and the
   parameters as protobuf bytes, never pickle) on the gloo control group, then the KV cache
   broadcast (`transport.broadcast`).
3. Ranks 1..N-1 wait in `worker.serve_rank`; on that message they receive the cache and run
   `worker.run_job`, the same function rank 0 runs: the rank's latent shard, its SP attention
   (`parallel`, through `velocity`), the step cache, and after every step rank 0's flag to go
   on or stop. The last step gathers every rank's shard, to the last rank's, on rank 0.
4. Back on rank 0, `engine` decodes the latents into a PNG (or returns them raw), emits the
   timings and the result on the handle, and the servicer sends them to the caller. A failure
   on any rank reaches the caller through `Engine._report_failure`; a failed collective also
   restarts the group.

`launch` says who starts the ranks and where they meet: our own launcher on this host, or
torchrun on one host or several, behind the one `RankGroup` interface. Every collective has a
timeout (`--collective-timeout`) and an idle rank 0 sends heartbeats, so no rank waits forever.
"""
