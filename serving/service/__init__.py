"""What a gRPC service of ours is made of, the same in both services: the
server shape (`server`), TLS and tokens (`security`, `access`, `credentials`), start-up checks
(`startup`, `addresses`), metrics, request ids and safe log strings (`requests`) and
`GetModelInfo` (`model_info`)."""
