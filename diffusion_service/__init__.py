"""The diffusion service: rank 0 takes a request's KV cache over gRPC, every rank denoises its
share of the image, and rank 0 streams progress, previews and the image back.

A request's path, by module:

1. `server` runs `bagel.v1.Diffusion` on rank 0. Its `servicer` assembles and checks the KV
   stream (`transport`), the parameters and the request id, wraps them in a `JobHandle` with a
   `JobSpec` (`job`), and queues it on the engine; from then on it streams the handle's events.
2. `engine` runs on one thread of rank 0 and owns every collective: it takes one job at a time,
   tells the other ranks of it (`RankGroup.send`, a `job` message: a command and the parameters
   as protobuf bytes, never pickle), broadcasts the KV cache (`transport.broadcast`), and runs
   rank 0's part of the job.
3. Every other rank runs `worker.serve_rank`: it receives the message and the cache, and runs
   the same `worker.run_job` as rank 0: its latent shard, its SP attention (`parallel`, through
   `velocity`), the step cache, and after every step rank 0's flag to go on or stop. At the end
   the latents are gathered on rank 0, down to the last rank's shard.
4. Back on rank 0, `engine` decodes the latents into a PNG (or returns them raw), emits the
   timings and the result on the handle, and the servicer sends them to the caller. A failure on
   any rank becomes one status in `Engine._report_failure`; a failed collective restarts the
   group.

Who starts the ranks, and where they meet, is `launch`'s: our own launcher on this host, or
torchrun on one host or several, behind one interface (`RankGroup`). Every collective has a
timeout (`--collective-timeout`), and an idle rank 0 sends heartbeats, so no rank waits forever.
"""
