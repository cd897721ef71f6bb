# syntax=docker/dockerfile:1
# A small non-root image: docker build -t commerce-worker .
# Migrations are compiled into the binary; the image needs only the binary and CA certificates
# (TLS to Redis/MySQL uses rustls with the webpki roots, so not even those, strictly).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --no-default-features \
    && rm -rf src
COPY src ./src
COPY sql ./sql
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --no-default-features \
    && strip target/release/commerce-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/commerce-worker /usr/local/bin/commerce-worker
COPY worker.toml /etc/commerce-worker/worker.toml
# distroless' nonroot user; matches runAsUser in deploy/k8s/deployment.yaml.
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/commerce-worker"]
CMD ["--config", "/etc/commerce-worker/worker.toml", "run"]
