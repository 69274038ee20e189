# The image of every Airflow container in docker-compose.yaml (and of the demo API).
#
# The Python tag is pinned to 3.11 because constraints.txt is a `pip freeze` taken on
# Python 3.11: the same interpreter resolves the same wheels. The Airflow version must equal
# the apache-airflow pin in requirements.txt (tests/test_docker_compose.py checks it).
FROM apache/airflow:3.3.2-python3.11

# The base image already runs as "airflow"; said again because the official image installs
# Python packages for that user, and a pip install as root would land where Airflow does not look.
USER airflow

# Only the dependency files: dags/, plugins/ and include/ are bind-mounted at run time, so
# editing them never invalidates this layer. requirements-distributed.txt includes
# requirements.txt by a relative path, hence one directory for all three.
WORKDIR /opt/airflow/requirements
COPY --chown=airflow:0 requirements.txt requirements-distributed.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements-distributed.txt -c constraints.txt

WORKDIR /opt/airflow
