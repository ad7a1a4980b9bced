/* threads.c: a small persistent pthread pool for the CPU kernels.
 *
 * Why not OpenMP: torch wheels carry their own OpenMP runtime, and a second one in
 * the process oversubscribes cores or aborts at load (DESIGN.md "Threads").
 * One job runs at a time; a caller that finds the pool busy (another Python thread
 * released the GIL and is inside a kernel) runs its job inline on its own thread,
 * which gives the same result because chunking never changes results.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdlib.h>

#include "../kernels.h"

#define CQ_MAX_THREADS 256
#define CQ_CHUNKS_PER_THREAD 4

typedef struct cq_job {
    cq_range_fn fn;
    void *ctx;
    int64_t units, align;
    int nchunks;
    int next_chunk;      /* next chunk to take, under pool.lock */
    int chunks_left;     /* chunks not yet finished, under pool.lock */
    int status;          /* first non-OK status, under pool.lock */
} cq_job;

static struct {
    pthread_mutex_t run_lock; /* held by the one caller whose job is in the pool */
    pthread_mutex_t lock;     /* guards everything below */
    pthread_cond_t work_cv, done_cv;
    pthread_t threads[CQ_MAX_THREADS];
    int nthreads;             /* workers started */
    int shutting_down;
    unsigned long generation; /* bumped for each job so sleeping workers see it */
    cq_job *job;
} pool = {.run_lock = PTHREAD_MUTEX_INITIALIZER,
          .lock = PTHREAD_MUTEX_INITIALIZER,
          .work_cv = PTHREAD_COND_INITIALIZER,
          .done_cv = PTHREAD_COND_INITIALIZER};

static void chunk_bounds(const cq_job *job, int c, int64_t *begin, int64_t *end) {
    /* Split [0, units) into nchunks near-equal pieces on multiples of align. */
    int64_t blocks = CQ_CDIV(job->units, job->align);
    int64_t b0 = blocks * c / job->nchunks, b1 = blocks * (c + 1) / job->nchunks;
    *begin = b0 * job->align;
    *end = b1 * job->align < job->units ? b1 * job->align : job->units;
}

/* Take and run chunks of the current job until none is left. Called with lock held;
 * returns with it held. */
static void run_chunks(cq_job *job) {
    while (job->next_chunk < job->nchunks) {
        int c = job->next_chunk++;
        pthread_mutex_unlock(&pool.lock);
        int64_t begin, end;
        chunk_bounds(job, c, &begin, &end);
        int st = begin < end ? job->fn(job->ctx, begin, end) : CQ_OK;
        pthread_mutex_lock(&pool.lock);
        if (st != CQ_OK && job->status == CQ_OK)
            job->status = st;
        if (--job->chunks_left == 0)
            pthread_cond_broadcast(&pool.done_cv);
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (!pool.shutting_down && (pool.job == NULL || pool.generation == seen))
            pthread_cond_wait(&pool.work_cv, &pool.lock);
        if (pool.shutting_down)
            break;
        seen = pool.generation;
        run_chunks(pool.job);
    }
    pthread_mutex_unlock(&pool.lock);
    return NULL;
}

/* Start workers up to `want` (the caller counts as one more). Called with lock held. */
static void grow_pool(int want) {
    if (want > CQ_MAX_THREADS)
        want = CQ_MAX_THREADS;
    while (pool.nthreads < want) {
        if (pthread_create(&pool.threads[pool.nthreads], NULL, worker_main, NULL) != 0)
            break; /* run with the workers we have */
        pool.nthreads++;
    }
}

static void after_fork_in_child(void) {
    /* The workers do not exist in a forked child: start from an empty pool. */
    pthread_mutex_init(&pool.run_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.work_cv, NULL);
    pthread_cond_init(&pool.done_cv, NULL);
    pool.nthreads = 0;
    pool.job = NULL;
    pool.shutting_down = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

int cq_parallel_for(int64_t units, int64_t align, int nthreads, int64_t min_units_per_thread,
                    cq_range_fn fn, void *ctx) {
    if (units <= 0)
        return CQ_OK;
    if (align < 1)
        align = 1;
    if (min_units_per_thread < 1)
        min_units_per_thread = 1;
    int64_t useful = units / min_units_per_thread;
    if (nthreads > useful)
        nthreads = (int)(useful > 1 ? useful : 1);
    if (nthreads > CQ_CDIV(units, align))
        nthreads = (int)CQ_CDIV(units, align);
    if (nthreads <= 1 || pthread_mutex_trylock(&pool.run_lock) != 0)
        return fn(ctx, 0, units);

    /* A few chunks per thread, taken first come first served: when another process holds
     * one of the cores (shared machines), the threads that do run take over the chunks of
     * the one that does not, instead of waiting for it at the end. */
    int64_t blocks = CQ_CDIV(units, align);
    int64_t nchunks = (int64_t)nthreads * CQ_CHUNKS_PER_THREAD;
    if (nchunks > useful)
        nchunks = useful > nthreads ? useful : nthreads;
    if (nchunks > blocks)
        nchunks = blocks;
    pthread_once(&atfork_once, install_atfork);
    cq_job job = {fn, ctx, units, align, (int)nchunks, 0, (int)nchunks, CQ_OK};
    pthread_mutex_lock(&pool.lock);
    grow_pool(nthreads - 1);
    pool.job = &job;
    pool.generation++;
    pthread_cond_broadcast(&pool.work_cv);
    run_chunks(&job);
    while (job.chunks_left > 0)
        pthread_cond_wait(&pool.done_cv, &pool.lock);
    pool.job = NULL;
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.run_lock);
    return job.status;
}

void cq_threads_shutdown(void) {
    pthread_mutex_lock(&pool.run_lock);
    pthread_mutex_lock(&pool.lock);
    pool.shutting_down = 1;
    pthread_cond_broadcast(&pool.work_cv);
    int n = pool.nthreads;
    pthread_mutex_unlock(&pool.lock);
    for (int i = 0; i < n; i++)
        pthread_join(pool.threads[i], NULL);
    pthread_mutex_lock(&pool.lock);
    pool.nthreads = 0;
    pool.shutting_down = 0;
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.run_lock);
}
