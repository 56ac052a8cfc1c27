# barrage in a container: one image, every role (`docker run IMAGE edge --config ...`).
#
# io_uring: Docker's default seccomp profile (and containerd 2.0's) blocks io_uring_setup, so the
# edge detects that and runs on epoll (the start-up log says `driver=legacy`). That is supported
# and tested, with lower fan-out than io_uring (docs/benchmarks.md). For io_uring, run the edge on
# the host under tuning/systemd/barrage-edge.service, or pass a seccomp profile that allows the
# three io_uring syscalls. sysctls are the host's: apply tuning/sysctl.d there, and raise the
# container's limits: --ulimit nofile=1048576:1048576 --ulimit memlock=67108864.
#
# Build: docker build -t barrage .   (the build needs only crates.io)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin barrage \
 && cp target/release/barrage /barrage

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin barrage \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/barrage
COPY --from=build /barrage /usr/local/bin/barrage
COPY examples/ /etc/barrage/examples/
# The broker's high-reach log (data_dir = "auto": /var/lib/barrage/broker-<node_id>-<port>) and
# up's certificate; mount a volume here to keep them across containers.
ENV STATE_DIRECTORY=/var/lib/barrage
VOLUME /var/lib/barrage
USER 10001:10001
# Client TCP, WebSocket, edge admin; broker ingest, links, HTTP; control HTTP.
EXPOSE 2243 2244 9243 7400 7401 7480 8080
ENTRYPOINT ["/usr/local/bin/barrage"]
CMD ["--help"]
