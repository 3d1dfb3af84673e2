/* OpenMPI peer of `shardline bench comm`: the same cases, timed the same way (warm-up, a barrier
 * before each timed operation, each iteration's time = the slowest rank's, median and nearest-rank
 * p99), printed by rank 0 as the same JSON keys plus "peer".
 *
 * Build: mpicc -O2 -o mpi_comm bench/peers/mpi_comm.c
 * Run:   mpirun -n 2 ./mpi_comm --op all_reduce,send_recv --sizes 8,8192,16777216 \
 *            --peer openmpi --transport shm [--iters N] [--json FILE]
 *        (OpenMPI's default shared memory: --mca pml ob1 --mca btl self,vader;
 *         over TCP: --mca pml ob1 --mca btl self,tcp; UCX without an RDMA device:
 *         --mca pml ucx --mca pml_ucx_tls any --mca pml_ucx_devices any, peer "openmpi-ucx").
 * mpirun binds each rank to a core by default, as `shardline bench comm` does (--bind core).
 * Only f32 is measured: MPI has no standard f16/bf16 type. `bytes` is the whole buffer of the
 * operation (all_gather output, reduce_scatter input), as in shardline's bench. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double *samples;

/* Times `iters` runs of `op` on `bytes`; fills samples with the slowest rank's microseconds. */
static int measure(const char *op, long bytes, int iters, float *a, float *b) {
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    long count = bytes / 4 < 1 ? 1 : bytes / 4;
    int split = !strcmp(op, "all_gather") || !strcmp(op, "reduce_scatter") || !strcmp(op, "all_to_all");
    if (split) count = (count / n < 1 ? 1 : count / n) * n;
    int warmup = iters / 10 < 5 ? 5 : iters / 10;
    double *mine = malloc(sizeof(double) * iters);
    for (int i = 0; i < warmup + iters; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t = MPI_Wtime();
        if (!strcmp(op, "all_reduce")) {
            MPI_Allreduce(MPI_IN_PLACE, a, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        } else if (!strcmp(op, "all_gather")) {
            MPI_Allgather(a, count / n, MPI_FLOAT, b, count / n, MPI_FLOAT, MPI_COMM_WORLD);
        } else if (!strcmp(op, "reduce_scatter")) {
            MPI_Reduce_scatter_block(a, b, count / n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        } else if (!strcmp(op, "broadcast")) {
            MPI_Bcast(a, count, MPI_FLOAT, 0, MPI_COMM_WORLD);
        } else if (!strcmp(op, "all_to_all")) {
            MPI_Alltoall(a, count / n, MPI_FLOAT, b, count / n, MPI_FLOAT, MPI_COMM_WORLD);
        } else if (!strcmp(op, "send_recv")) {
            if (rank == 0) {
                MPI_Send(a, count, MPI_FLOAT, 1, 0, MPI_COMM_WORLD);
                MPI_Recv(b, count, MPI_FLOAT, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 1) {
                MPI_Recv(b, count, MPI_FLOAT, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(b, count, MPI_FLOAT, 0, 0, MPI_COMM_WORLD);
            }
        } else {
            if (rank == 0) fprintf(stderr, "mpi_comm: unknown op '%s'\n", op);
            free(mine);
            return -1;
        }
        double us = (MPI_Wtime() - t) * 1e6;
        if (i >= warmup) {
            if (!strcmp(op, "send_recv")) us = rank == 0 ? us / 2 : 0;
            mine[i - warmup] = us;
        }
        if (!strcmp(op, "all_reduce"))
            for (long j = 0; j < count; j++) a[j] = 1.0f;
    }
    MPI_Allreduce(mine, samples, iters, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    free(mine);
    return 0;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    const char *ops = "all_reduce,send_recv", *sizes = "8,8192,16777216", *peer = "openmpi";
    const char *transport = "shm", *json = NULL;
    int fixed_iters = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--op")) ops = argv[i + 1];
        else if (!strcmp(argv[i], "--sizes")) sizes = argv[i + 1];
        else if (!strcmp(argv[i], "--peer")) peer = argv[i + 1];
        else if (!strcmp(argv[i], "--transport")) transport = argv[i + 1];
        else if (!strcmp(argv[i], "--iters")) fixed_iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--json")) json = argv[i + 1];
        else if (!strcmp(argv[i], "--dtype")) {
            if (strcmp(argv[i + 1], "f32")) {
                if (rank == 0) fprintf(stderr, "mpi_comm: only --dtype f32 is supported\n");
                MPI_Abort(MPI_COMM_WORLD, 2);
            }
        } else {
            if (rank == 0) fprintf(stderr, "mpi_comm: unknown argument '%s'\n", argv[i]);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    FILE *out = json && rank == 0 ? fopen(json, "a") : NULL;
    if (json && rank == 0 && !out) {
        fprintf(stderr, "mpi_comm: cannot open %s\n", json);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    char opbuf[256], sizebuf[1024];
    snprintf(opbuf, sizeof opbuf, "%s", ops);
    for (char *op_save, *op = strtok_r(opbuf, ",", &op_save); op; op = strtok_r(NULL, ",", &op_save)) {
        snprintf(sizebuf, sizeof sizebuf, "%s", sizes);
        for (char *s_save, *s = strtok_r(sizebuf, ",", &s_save); s; s = strtok_r(NULL, ",", &s_save)) {
            long bytes = atol(s);
            long unit = bytes < 4096 ? 4096 : bytes;
            int iters = fixed_iters > 0 ? fixed_iters : (int)(50000000 / unit);
            if (!fixed_iters) iters = iters < 20 ? 20 : iters > 2000 ? 2000 : iters;
            long count = bytes / 4 < n ? n : bytes / 4;
            float *a = malloc(count * 4), *b = malloc(count * 4);
            for (long j = 0; j < count; j++) a[j] = b[j] = 1.0f;
            samples = malloc(sizeof(double) * iters);
            if (measure(op, bytes, iters, a, b) != 0) MPI_Abort(MPI_COMM_WORLD, 2);
            if (rank == 0) {
                qsort(samples, iters, sizeof(double), cmp_double);
                double median = iters % 2 ? samples[iters / 2] : (samples[iters / 2 - 1] + samples[iters / 2]) / 2;
                int p99 = (int)((iters * 99 + 99) / 100);
                p99 = p99 < 1 ? 1 : p99 > iters ? iters : p99;
                char line[512];
                snprintf(line, sizeof line,
                         "{\"bench\":\"comm\",\"peer\":\"%s\",\"op\":\"%s\",\"transport\":\"%s\","
                         "\"dtype\":\"f32\",\"ranks\":%d,\"bytes\":%ld,\"gbps\":%.3f,"
                         "\"median_us\":%.3f,\"p99_us\":%.3f,\"iters\":%d}",
                         peer, op, transport, n, bytes, bytes / (median * 1e3), median,
                         samples[p99 - 1], iters);
                puts(line);
                if (out) fprintf(out, "%s\n", line);
            }
            free(a);
            free(b);
            free(samples);
        }
    }
    if (out) fclose(out);
    MPI_Finalize();
    return 0;
}
