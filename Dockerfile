# syntax=docker/dockerfile:1
# Multi-stage build of the wsbus node: a release build in the Rust image, a small Debian
# runtime with only the binary, running as a non-root user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them. The load tester stays a stub:
# the workspace needs the member, the image does not need its code.
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
RUN mkdir -p src loadtest/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs && touch loadtest/src/lib.rs \
    && cargo build --release -p wsbus \
    && rm -rf src
COPY src src
COPY migrations migrations
COPY static static
RUN touch src/main.rs src/lib.rs && cargo build --release -p wsbus

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin wsbus
COPY --from=build /src/target/release/wsbus /usr/local/bin/wsbus
USER 10001:10001
ENV WSBUS_BIND=0.0.0.0:8080 \
    WSBUS_LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["wsbus", "probe", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["wsbus"]
CMD ["serve"]
